"""Quantized weights: the q8/q4 formats, the CPU decode kernels that read them, the cache plan."""

from krasis.common.quant.formats import QUANT_FORMATS, QuantizedWeight, QuantSpec, dequantize, quantize

__all__ = ["QUANT_FORMATS", "QuantSpec", "QuantizedWeight", "dequantize", "quantize"]
