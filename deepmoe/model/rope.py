"""Rotary position embedding for MLA's decoupled `qk_rope_head_dim` channels, with YaRN.

Only the rope channels rotate. DeepSeek checkpoints are trained with the *interleaved* pairing
(channels 2i, 2i+1 share a frequency); `rope_interleave=False` selects the rotate-half pairing.
YaRN follows transformers' `_compute_yarn_parameters` exactly: blended inverse frequencies, a
cos/sin "attention factor", and a softmax-scale correction mscale(factor, mscale_all_dim)².
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq (d_rope/2,) fp32, attention_factor multiplying cos and sin)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor = rs["factor"]
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    orig = rs["original_max_position_embeddings"]

    def correction_dim(n_rot: float) -> float:
        # the rope dimension whose wavelength completes n_rot turns over the original context
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency; 0: interpolate by `factor`
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv_freq, attention_factor


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float):
    """positions (T,) or (B, T) → cos, sin of shape positions.shape + (d_rope/2,), fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """x (B, T, H, d_rope); cos/sin (T, d_rope/2) or (B, T, d_rope/2). Rotation done in fp32."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x32 = x.float()
    if interleave:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = x32[..., :half], x32[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
