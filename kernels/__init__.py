"""Fused Triton kernels for noprop_fast, installed as `noprop_fast.kernels`.

One file per fused op (see the project's style guide): the plain-PyTorch reference, the kernels,
their launchers and autograd Functions. The reference path of the engine does not import this
package, so it works where Triton is absent.
"""
