"""The DeepSeek-V2/V3 causal language model: embeddings, decoder blocks, final norm, head, MTP.

Module names follow the Hugging Face checkpoint (`model.layers.N.self_attn.kv_b_proj`, ...), so the
state dict maps onto checkpoint keys one to one except for the stacked routed experts and the MTP
modules (see deepmoe/checkpoint.py). The model is single-device and cache-agnostic: a caller that
wants incremental decoding passes its own `LatentCache`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import LatentCache
from .block import Block
from .experts import Experts
from .mtp import MTPModule
from .norm import RMSNorm
from .precision import FP32Buffers
from .rope import rope_cos_sin, rope_frequencies
from .router import Gate, Routing


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepSeekModel(FP32Buffers):
    fp32_buffers = ("inv_freq",)  # rotary phases at long positions need fp32 frequencies

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList(MTPModule(cfg, k + 1) for k in range(cfg.num_nextn_predict_layers))
        inv_freq, self.rope_attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # ---- forward passes ------------------------------------------------------------------------
    def rope(self, T: int, start_pos: int | torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for T positions from start_pos: an int (every row alike) or a (B,) tensor of per-row
        starts (a batch of sequences at different lengths, as a serving engine decodes them)."""
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.to(device)[:, None] + torch.arange(T, device=device)  # (B, T)
        else:
            positions = torch.arange(start_pos, start_pos + T, device=device)
        return rope_cos_sin(self.inv_freq.float(), positions, self.rope_attention_factor)

    def hidden_states(self, input_ids: torch.Tensor, cache: LatentCache | None = None, start_pos: int = 0,
                      absorb: bool = False, router_out: list[Routing] | None = None,
                      capacity_factor: float | None = None, sync_free: bool = False) -> torch.Tensor:
        """input_ids (B, T) → final normed hidden states (B, T, d), the input of lm_head.
        router_out, if given, receives every MoE layer's Routing in order; capacity_factor: see MoE.
        sync_free: no host reads and no data-dependent shapes (a compiled or CUDA-graphed decode step)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(input_ids.shape[1], start_pos, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start_pos, absorb, router_out, capacity_factor, sync_free)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: LatentCache | None = None, start_pos: int = 0,
                absorb: bool = False) -> torch.Tensor:
        """input_ids (B, T) → logits (B, T, vocab) of the main head."""
        return self.lm_head(self.hidden_states(input_ids, cache, start_pos, absorb))

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                   router_out: list[Routing] | None = None, capacity_factor: float | None = None
                   ) -> list[torch.Tensor]:
        """Training-time MTP: depth k's logits (B, T-k, vocab) at position i predict token i+k+1."""
        return [self.lm_head(s) for s in self.mtp_head_inputs(hidden, input_ids, router_out, capacity_factor)]

    def mtp_head_inputs(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                        router_out: list[Routing] | None = None, capacity_factor: float | None = None
                        ) -> list[torch.Tensor]:
        """What mtp_logits puts through lm_head: depth k's normed hidden states (B, T-k, d), for losses that
        apply the head themselves (chunked, without materialising the logits)."""
        out, h = [], hidden
        T = input_ids.shape[1]
        for k in range(1, len(self.mtp) + 1):
            if T - k <= 0:
                break
            h = self.mtp_hidden(k, h[:, : T - k], input_ids[:, k:], router_out=router_out,
                                capacity_factor=capacity_factor)
            out.append(self.mtp[k - 1].shared_head.norm(h))
        return out

    def mtp_hidden(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache: LatentCache | None = None,
                   start_pos: int | torch.Tensor = 0, router_out: list[Routing] | None = None,
                   capacity_factor: float | None = None, sync_free: bool = False) -> torch.Tensor:
        """MTP depth `depth` (1-based) at positions start_pos ..: h_prev (B, T, d) is the previous depth's
        output (the main model's final normed hidden state for depth 1), next_ids (B, T) the tokens `depth`
        positions ahead → (B, T, d). Its cache layer is num_hidden_layers + depth - 1. sync_free: see
        hidden_states."""
        cos, sin = self.rope(next_ids.shape[1], start_pos, h_prev.device)
        return self.mtp[depth - 1](h_prev, self.model.embed_tokens(next_ids), cos, sin, cache, start_pos,
                                   router_out=router_out, capacity_factor=capacity_factor, sync_free=sync_free)

    def mtp_head(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of MTP depth `depth` from its hidden state: at position i they predict token i+depth+1."""
        return self.lm_head(self.mtp[depth - 1].shared_head.norm(h))

    # ---- parameters ----------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """With tie_word_embeddings the head is the embedding matrix. `to_empty` (used when loading) gives
        every module fresh parameters and so unties them: call again after it."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute derived buffers (after `to_empty`, which leaves them uninitialised)."""
        with torch.no_grad():
            self.inv_freq.copy_(rope_frequencies(self.config)[0])

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """All weight initialisation in one place: N(0, initializer_range) matrices, unit norms, zero bias."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                _normal(module.weight, std, gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Experts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    _normal(p, std, gen)
            elif isinstance(module, Gate):
                _normal(module.weight, std, gen)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _normal(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    if t.device.type == "meta":
        return
    t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std).to(t.dtype))


def build_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int | None = 0) -> DeepSeekModel:
    """A freshly initialised model; on the meta device nothing is allocated (for counting)."""
    with torch.device(device):
        model = DeepSeekModel(cfg)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model.to(dtype)

