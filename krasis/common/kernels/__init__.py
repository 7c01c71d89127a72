"""Compute kernels shared by the workers; gpu/ holds the GPU ones (Triton on CUDA, torch elsewhere)."""
