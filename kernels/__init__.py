"""Fused Triton kernels for noprop_fast, installed as `noprop_fast.kernels`.

One file per fused op (see the project's style guide): the plain-PyTorch reference, the kernels,
their launchers and autograd Functions. The reference path of the engine does not import this
package, so it works where Triton is absent.

    noise.py         noise injection: z[t] = sqrt(abar) W[y] + sqrt(1 - abar) eps, Philox in-kernel
    block_loss.py    the weighted per-block denoising losses of all blocks in one pass
    block_linear.py  Y[t] = X[t] W[t]^T + b[t] over stacked per-block weights
    softmax_head.py  u_hat = softmax(H K^T + c) V with an online softmax (no N x m logits)
    aot.py           ahead-of-time compilation for sm_90 / sm_80 and the cubin's resource usage
    releases.py      the launch configurations that differ by Triton release, chosen in one place
"""
import os

# Keep fused multiply-add contraction, Triton 3.9's default, explicitly: the default changes in
# Triton 3.10, and the kernels' tolerances and register budgets were measured with it on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
