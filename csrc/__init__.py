"""C++ sources of the CPU fused ops, built by noprop_fast.ops.cpp"""
