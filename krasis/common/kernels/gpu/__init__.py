"""GPU kernels for prefill: q4/q8 dequantization and the routed-expert grouped GEMMs."""
