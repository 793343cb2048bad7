"""Weight quantization as pure functions: schemes, round-to-nearest and GPTQ, with the
numbers of compressed-tensors (the format quantized checkpoints are saved in)."""

from moekit.methods.quantize.gptq import HessianAccumulator, quantize_gptq
from moekit.methods.quantize.rtn import qparams, quantize_rtn
from moekit.methods.quantize.scheme import QuantizedWeight, QuantScheme

__all__ = ["HessianAccumulator", "QuantScheme", "QuantizedWeight", "qparams", "quantize_gptq", "quantize_rtn"]
