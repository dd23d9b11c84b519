"""The DeepSeek-V2/V3 architecture: MLA attention, DeepSeekMoE, multi-token prediction."""

from .transformer import DeepSeekModel, build_model

__all__ = ["DeepSeekModel", "build_model"]
