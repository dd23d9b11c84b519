"""The two models an inference benchmark compares: deepmoe's and transformers', same weights, same device.

A model directory, or random weights of a preset saved to a temporary directory so both sides load the
same checkpoint. fp32 on CPU, bf16 on CUDA. transformers is loaded once per experts setting asked for
(--hf-impl) and ratios are taken against the fastest: on CPU both `eager` (a loop over the experts that
received tokens, which can win at batch 1) and `grouped_mm`; on CUDA `grouped_mm` only (measured far
ahead of eager there, PERF.md; a second copy of a 15.7B model would not fit beside ours). Where torch's
grouped-GEMM kernel cannot run on the device, transformers silently swaps in its own per-expert fallback,
and we say so. Both sides generate exactly the requested number of tokens: deepmoe ignores eos, and
transformers' generation config has no eos token (rather than a `min_new_tokens` logits processor, which
deepmoe would not run).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

import torch

from deepmoe.checkpoint import load_pretrained, save_pretrained
from deepmoe.config import ModelConfig
from deepmoe.model import DeepSeekModel, build_model


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a model directory (default: random weights of --preset)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hf-impl", nargs="+", default=None,
                   help="transformers experts_implementation values (default: eager grouped_mm on CPU, grouped_mm "
                        "on CUDA); ratios are against the fastest")


@dataclass
class Contenders:
    device: torch.device
    dtype: torch.dtype
    ours: DeepSeekModel  # without MTP layers
    hf: dict[str, torch.nn.Module]  # experts_implementation → model
    drafting: DeepSeekModel | None  # with MTP layers, when asked for and the directory has them
    label: str  # what was loaded, for the report

    def describe(self) -> str:
        d = self.device
        where = torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        return f"device {where}, {self.label}"


def grouped_mm_kernel_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether transformers' grouped_mm experts would run torch's grouped GEMM here (not its fallback)."""
    try:  # transformers' own predicate, where this version has it
        from transformers.integrations.moe import _can_use_grouped_mm
    except ImportError:
        _can_use_grouped_mm = None
    if _can_use_grouped_mm is not None:
        x, w = torch.zeros(4, 8, device=device, dtype=dtype), torch.zeros(2, 8, 8, device=device, dtype=dtype)
        return bool(_can_use_grouped_mm(x, w, torch.tensor([2, 4], device=device, dtype=torch.int32)))
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def experts_implementation(impl: str, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """from_pretrained keyword arguments for transformers' experts `impl`, with a note where grouped_mm
    would not run torch's kernel on this device."""
    if impl == "grouped_mm" and not grouped_mm_kernel_available(device, dtype):
        print(f"note: torch's grouped GEMM is unavailable for {dtype} on {device}; transformers runs its "
              "grouped_mm fallback (a per-expert loop), so its figure is not its fastest")
    return {"experts_implementation": impl}


def load_contenders(args, with_mtp: bool = False) -> Contenders:
    import transformers

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            cfg = ModelConfig.from_preset(args.preset).replace(num_nextn_predict_layers=0)
            save_pretrained(build_model(cfg, seed=0), tmp)
            path = tmp
        ours = load_pretrained(path, device=device, dtype=dtype, load_mtp=False)
        drafting = load_pretrained(path, device=device, dtype=dtype) if with_mtp and args.model else None
        hf = {}
        for impl in args.hf_impl or (["grouped_mm"] if device.type == "cuda" else ["eager", "grouped_mm"]):
            hf[impl] = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, **experts_implementation(impl, device, dtype)).to(device).eval()
            hf[impl].generation_config.eos_token_id = None  # exactly max_new_tokens, as deepmoe's ignore_eos
    label = args.model or f"{args.preset} (random weights)"
    return Contenders(device, dtype, ours, hf, drafting if drafting is not None and len(drafting.mtp) else None,
                      label)
