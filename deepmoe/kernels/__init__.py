"""Fast paths for the hot spots of decode, one Triton kernel per file, each beside the plain torch
reference that defines it and serves as the fallback where Triton cannot run."""

from .paged_mla_decode import default_num_splits, paged_mla_decode, paged_mla_decode_reference
from .quant_matmul import quant_matmul, quant_matmul_reference

__all__ = ["default_num_splits", "paged_mla_decode", "paged_mla_decode_reference", "quant_matmul",
           "quant_matmul_reference"]
