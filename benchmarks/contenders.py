"""The two models an inference benchmark compares: deepmoe's and transformers', same weights, same device.

A model directory, or random weights of a preset saved to a temporary directory so both sides load the
same checkpoint. fp32 on CPU, bf16 on CUDA.
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
    p.add_argument("--hf-impl", default="eager", help="transformers experts_implementation")


@dataclass
class Contenders:
    device: torch.device
    dtype: torch.dtype
    ours: DeepSeekModel  # without MTP layers
    hf: torch.nn.Module
    drafting: DeepSeekModel | None  # with MTP layers, when asked for and the directory has them
    label: str  # what was loaded, for the report

    def describe(self) -> str:
        d = self.device
        where = torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        return f"device {where}, {self.label}"


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
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                               experts_implementation=args.hf_impl).to(device).eval()
    label = args.model or f"{args.preset} (random weights)"
    return Contenders(device, dtype, ours, hf, drafting if drafting is not None and len(drafting.mtp) else None,
                      label)
