"""Multi-head latent attention (MLA), in its two equal forms.

Keys and values are generated from a per-token latent: `kv_a_proj_with_mqa` gives c_kv (kv_lora_rank
wide, normalised) plus one shared rope key k_pe. `kv_b_proj` expands c_kv to per-head k_nope and v.

- naive form (training, prefill): expand K (nope+rope) and V per head, then ordinary attention.
- absorbed form (decode, and any call with a cache): fold kv_b_proj's key half into the query and
  its value half into the output, so attention runs directly over the cached latent
  (kv_lora_rank + qk_rope_head_dim values per token per layer).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale

SCORES_BUDGET = 2**26  # attention scores held at once in absorbed form (fp32 elements: 256 MiB)


class LatentCache(Protocol):
    """What the model needs from a KV cache; allocation and layout belong to the caller."""

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Store (B, T, r) latents and (B, T, d_rope) rope keys at start_pos; return all keys so far, or None
        when the cache attends itself (a paged kernel reading its blocks in place): then `attend` is called."""
        ...

    def attend(self, layer_idx: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float) -> torch.Tensor:
        """Only for caches whose update returns None: q_lat (B, H, T, r), q_pe (B, H, T, d_rope) over the
        cached latents (keys up to each query's position) → o_lat (B, H, T, r)."""
        ...


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.interleave = cfg.rope_interleave
        self.scale = softmax_scale(cfg)
        d, H, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, start_pos: int = 0, absorb: bool = False) -> torch.Tensor:
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, r)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)  # (B, T, d_rope)

        if cache is not None:
            keys = cache.update(self.layer_idx, c_kv, k_pe, start_pos)
            if keys is None:  # the cache attends in place
                return self.o_proj(self._absorbed(q_nope, q_pe, None, None, 0, cache).reshape(
                    B, T, self.n_heads * self.v_dim))
            c_kv, k_pe = keys
            absorb = True
        if absorb:
            # the keys start at position 0 of the cache, or, without one, at this call's first token
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, start_pos if cache is not None else 0)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope)], dim=-1)
        qk_dim = self.nope + self.rope
        if q.device.type == "cpu" and self.v_dim < qk_dim:
            # CPU SDPA's flash kernel needs v_dim == qk_dim, else it falls back to the math kernel, which
            # materialises (B, H, T, T) and ignores causality: zero-padding v and slicing is ~2x faster
            v = F.pad(v, (0, qk_dim - self.v_dim))
        # SDPA wants (B, H, T, D)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=self.scale)
        return out.transpose(1, 2)[..., : self.v_dim]  # (B, T, H, v)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, start_pos: int | torch.Tensor,
                  cache: LatentCache | None = None) -> torch.Tensor:
        """Attention over the latents c_kv (B, S, r), k_pe (B, S, d_rope), or, given a cache that attends in
        place, over the cache's own blocks."""
        B, T, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # (H, nope, r), (H, v, r)
        # batched matmuls over (B, H): cheaper to dispatch than einsum at decode sizes
        q_lat = q_nope.transpose(1, 2) @ w_uk  # (B, H, T, r): the query in latent space
        q_pe = q_pe.transpose(1, 2)  # (B, H, T, d_rope)
        if cache is not None:
            o_lat = cache.attend(self.layer_idx, q_lat, q_pe, self.scale)
        else:
            # a long prefill chunk over a long history would materialise all (B, H, T, S) scores at once:
            # take the queries in slices so the scores stay under SCORES_BUDGET elements
            step = max(1, SCORES_BUDGET // (B * H * c_kv.shape[1]))
            slices = [self._attend_latent(q_lat[:, :, i:i + step], q_pe[:, :, i:i + step], c_kv, k_pe, start_pos, i)
                      for i in range(0, T, step)]
            o_lat = slices[0] if len(slices) == 1 else torch.cat(slices, dim=2)  # (B, H, T, r); decode: no copy
        return (o_lat @ w_uv.mT).transpose(1, 2)  # (B, T, H, v)

    def _attend_latent(self, q_lat, q_pe, c_kv, k_pe, start_pos: int | torch.Tensor, first: int) -> torch.Tensor:
        """Queries first .. first+t-1 of this call (B, H, t, ·) over the latent keys (B, S, ·) → (B, H, t, r)."""
        t, S = q_lat.shape[2], c_kv.shape[1]
        scores = q_lat @ c_kv.unsqueeze(1).mT + q_pe @ k_pe.unsqueeze(1).mT  # (B, H, t, S)
        scores = scores.float() * self.scale
        # query i sits at absolute position start_pos + i and sees keys 0 .. start_pos + i; with per-row
        # starts (B,) the mask is per row, which also hides a shorter row's padding keys
        offsets = torch.arange(first, first + t, device=scores.device)
        if isinstance(start_pos, torch.Tensor):
            q_pos = start_pos.to(scores.device)[:, None, None] + offsets[:, None]  # (B, t, 1)
            visible = (torch.arange(S, device=scores.device) <= q_pos).unsqueeze(1)  # (B, 1, t, S)
        else:
            visible = torch.arange(S, device=scores.device) <= (start_pos + offsets)[:, None]  # (t, S)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(c_kv.dtype)
        return probs @ c_kv.unsqueeze(1)  # (B, H, t, r)
