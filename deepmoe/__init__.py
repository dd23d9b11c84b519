"""deepmoe: DeepSeek-V2/V3 Mixture-of-Experts language models in compact PyTorch."""

from .config import ConfigError, ModelConfig
from .model import DeepSeekModel, build_model

__version__ = "0.1.0"


def __getattr__(name):
    # checkpoint I/O pulls in safetensors; keep `import deepmoe` light until it is used
    if name in ("load_pretrained", "save_pretrained", "CheckpointError"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name in ("LLM", "SamplingParams"):  # the inference engine, vLLM-style
        from .engine import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'deepmoe' has no attribute {name!r}")


__all__ = ["ConfigError", "ModelConfig", "DeepSeekModel", "build_model", "load_pretrained", "save_pretrained",
           "CheckpointError", "LLM", "SamplingParams"]
