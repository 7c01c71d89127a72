"""Compute kernels shared by the workers; gpu/ holds the GPU ones (Triton on CUDA, torch elsewhere), cpu/ the C++ ones
of the CPU decode step that are not about a weight format (those are in common/quant)."""
