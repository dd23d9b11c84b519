"""Single-sequence-batch generation with a contiguous MLA latent cache.

The cache holds, per layer, only c_kv (kv_lora_rank) and the rotated k_pe (qk_rope_head_dim) of
every past token; the model attends over it in absorbed form. This is the simple, exact decoding
loop (prefill once, then one token per step) that the serving engine is measured against, and the
trainer's end-of-run sample (the model being trained, as it is: no paged cache to size, no weight
re-layout). Everything else, `deepmoe generate` included, decodes with the engine (`deepmoe.LLM`).
"""

from __future__ import annotations

import torch

from .engine.sampler import filter_logits
from .engine.sequence import SamplingParams
from .model import DeepSeekModel


class ContiguousLatentCache:
    """Per-layer (B, max_len, r) latents and (B, max_len, d_rope) rope keys, filled left to right."""

    def __init__(self, model: DeepSeekModel, batch_size: int, max_len: int, dtype=None, device=None):
        cfg = model.config
        p = model.lm_head.weight
        dtype, device = dtype or p.dtype, device or p.device
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.c_kv = torch.zeros(n, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int):
        end = start_pos + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's {self.max_len}")
        self.c_kv[layer_idx, :, start_pos:end] = c_kv
        self.k_pe[layer_idx, :, start_pos:end] = k_pe
        return self.c_kv[layer_idx, :, :end], self.k_pe[layer_idx, :, :end]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) → next token ids (B,). temperature 0 is greedy. The filters and the validation of
    their parameters are the engine's."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: DeepSeekModel, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None, seed: int | None = None
             ) -> torch.Tensor:
    """input_ids (B, T) → (B, T + n) with n ≤ max_new_tokens (stops early once every row hit eos)."""
    B, T = input_ids.shape
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)  # the engine's checks, before any work
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    max_len = T + max_new_tokens
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"of {model.config.max_position_embeddings} tokens")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    cache = ContiguousLatentCache(model, B, max_len)
    logits = model(input_ids, cache=cache, start_pos=0)[:, -1]
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)  # finished rows pad with eos
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model(nxt[:, None], cache=cache, start_pos=T + step)[:, -1]
    return torch.cat(out, dim=1)
