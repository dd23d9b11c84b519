"""LoRA for DeepSeek MoE models: adapters on MLA, dense/shared MLPs and the stacked routed experts.

    report = apply_lora(model, LoraConfig(rank=8, alpha=16, targets=("all-linear", "experts")))
    ...train the parameters that require grad...
    save_adapter(model, "run/adapter", base_model_path="base")   # peft's layout: peft loads it too
    load_adapter(model, "run/adapter"); merge_lora(model)          # serve on merged weights
    merge_adapter("run/adapter", "merged")                         # a full checkpoint on disk
"""

from .adapter import AdapterError, load_adapter, read_adapter_config, save_adapter
from .apply import LoraConfig, LoraReport, apply_lora, available_targets, lora_report, merge_lora, trainable_parameters
from .layers import LoraExperts, LoraLinear
from .merge import merge_adapter

__all__ = ["AdapterError", "LoraConfig", "LoraExperts", "LoraLinear", "LoraReport", "apply_lora", "available_targets",
           "load_adapter", "lora_report", "merge_adapter", "merge_lora", "read_adapter_config", "save_adapter",
           "trainable_parameters"]
