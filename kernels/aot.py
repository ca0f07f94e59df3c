"""Ahead-of-time compilation of the Triton kernels for a GPU that need not be present.

Every kernel module declares `AOT_SPECS`: the kernels it launches, with a signature and the
constexprs of every configuration it may run (each autotune config included). `compile_spec`
compiles one for an NVIDIA target (sm_90: H100, sm_80: A100) with the ptxas bundled in the Triton
wheel, and reads off the cubin what the hardware will see:

    registers per thread, stack and local memory (non-zero means register spills), shared memory,
    and on sm_90 whether matrix products use Hopper's warpgroup MMA (HGMMA in the SASS).

No GPU and no CUDA driver are needed. This must run in a process without TRITON_INTERPRET.
"""
import importlib
import pkgutil
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory per block, opt-in maximum


@dataclass(frozen=True)
class KernelSpec:
    """One compilable configuration of a @triton.jit kernel."""
    name: str                  # unique, e.g. "block_linear_fwd[64x64x32,w4,s3]"
    fn: object                 # the @triton.jit function
    signature: dict            # argument name -> Triton type ("*fp32", "i32", ...), non-constexpr only
    constexprs: dict = field(default_factory=dict)  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    expects_wgmma: bool = False  # a matmul that should use HGMMA on sm_90
    archs: tuple = (80, 90)    # the targets whose launches pick this configuration


@dataclass(frozen=True)
class Compiled:
    spec: KernelSpec
    arch: int
    aligned: bool
    registers: int
    stack: int
    local: int
    shared: int
    uses_wgmma: bool

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def _nvidia_tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in this Triton wheel")
    return str(path)


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the (single) function in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    line = next(l for l in text.splitlines() if "REG:" in l)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_nvidia_tool("nvdisasm"), f.name], capture_output=True, text=True,
                              check=True).stdout


def aligned_attrs(spec: KernelSpec) -> dict:
    """The hints the runtime adds for aligned arguments: every pointer 16-byte aligned and every
    integer a multiple of 16. Compiled with them, a kernel takes its fast path (vectorised and
    asynchronous copies, software pipelining), which uses registers and shared memory differently."""
    hint = [["tt.divisibility", 16]]
    return {(spec.fn.arg_names.index(name),): hint for name, kind in spec.signature.items()
            if kind.startswith("*") or kind in ("i32", "i64")}


def compile_spec(spec: KernelSpec, arch: int = 90, aligned: bool = False) -> Compiled:
    """aligned=False: the general case (odd sizes, unaligned views); True: aligned arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                       attrs=aligned_attrs(spec) if aligned else None)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    cubin = kernel.asm["cubin"]
    usage = resource_usage(cubin)
    shared = max(usage.get("SHARED", 0), int(getattr(kernel.metadata, "shared", 0) or 0))
    return Compiled(spec=spec, arch=arch, aligned=aligned, registers=usage.get("REG", 0),
                    stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0), shared=shared,
                    uses_wgmma=arch >= 90 and "HGMMA" in sass(cubin))


def all_specs() -> list[KernelSpec]:
    """AOT_SPECS of every kernel module in noprop_fast.kernels."""
    import noprop_fast.kernels as package
    specs = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name == "aot":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        specs.extend(getattr(module, "AOT_SPECS", []))
    return specs
