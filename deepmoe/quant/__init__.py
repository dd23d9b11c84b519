"""Weight-only int8 / int4 quantisation: schemes, quantised modules, the compressed-tensors format."""

from .format import read_scheme
from .modules import QuantExperts, QuantLinear, prepare_cpu, use_reference
from .quantize import quantize_checkpoint, quantize_model
from .scheme import QuantError, QuantScheme, dequantize_groups, pack_int4, quantize_groups, unpack_int4

__all__ = ["QuantError", "QuantExperts", "QuantLinear", "QuantScheme", "dequantize_groups", "pack_int4",
           "prepare_cpu", "quantize_checkpoint", "quantize_groups", "quantize_model", "read_scheme",
           "unpack_int4", "use_reference"]
