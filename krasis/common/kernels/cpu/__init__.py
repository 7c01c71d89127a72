"""CPU kernels of the decode step that are not about a weight format (those live in common/quant)."""
