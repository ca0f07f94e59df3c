"""noprop_fast: fast, faithful NoProp training. `pip install -e .` (add `[test]` for the tests).

The top-level folder `kernels/` is installed as `noprop_fast.kernels`: a top-level package called
`kernels` would clash with an existing one.
"""
from setuptools import setup

setup(
    name="noprop_fast",
    version="0.1.0",
    description="Fast, faithful NoProp training: batched multi-block models, fused kernels, CLI",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=["noprop_fast", "noprop_fast.data", "noprop_fast.models", "noprop_fast.ops",
              "noprop_fast.kernels", "noprop_fast.csrc"],
    package_dir={"noprop_fast.kernels": "kernels", "noprop_fast.csrc": "csrc"},
    package_data={"noprop_fast": ["configs/*.yaml"], "noprop_fast.csrc": ["*.cpp", "*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "scikit-learn",   # the bundled digits dataset: the offline default
        "datasets",       # MNIST / CIFAR from the hub or from a datasets save
        "matplotlib",     # the comparison report's plots
        "triton; platform_system == 'Linux'",  # the fused kernels (interpreted or compiled ahead of time without a GPU)
        "ninja",          # torch.utils.cpp_extension.load builds the CPU fused ops (csrc/) with it
        "nvtx",           # the NVTX ranges for Nsight (without it: torch.cuda.nvtx, no domain or colours)
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["noprop-train=noprop_fast.train:main",
                                      "noprop-compare=noprop_fast.compare:main"]},
)
