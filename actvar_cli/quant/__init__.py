"""Weight-only quantization: int8 and int4 linear layers that dequantize right before their matmul."""
