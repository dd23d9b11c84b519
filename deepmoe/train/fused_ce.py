"""The vocabulary head and its cross-entropy in one pass over row chunks, never holding the whole logits.

At pretraining sizes the logits are the largest activation of the step: 8 × 1024 tokens × 32,000 classes
is 1 GiB in fp32, plus a bf16 copy and a gradient of the same size. Here the rows go through the head
`chunk` at a time; each chunk's logits live only while its loss and its gradients are taken, and the
gradients of the hidden states and of the head weight are computed in the forward pass (the only thing
backward still has to do is scale them by the incoming gradient). Memory for the head drops from
O(N · V) to O(chunk · V) plus the gradients themselves, for no extra FLOPs: the three matmuls are the ones
autograd would run (logits, dlogits·W, dlogitsᵀ·h), chunked.

Numerics follow the plain path under autocast: the matmuls in the compute dtype (bf16 under autocast,
else the inputs' dtype), the softmax and the loss in fp32, and the weight's gradient accumulated over
chunks in fp32. `cross_entropy(hidden @ W.T)` is the reference (tests compare values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMENTS = 2**25  # logits per chunk: 128 MiB in fp32, whatever the vocabulary size


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n_valid = (targets != IGNORE).sum().clamp(min=1)
            want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h.shape[0], chunk):
                hc, tc = h[start:start + chunk], targets[start:start + chunk]
                logits = (hc @ w.T).float()
                total = total + F.cross_entropy(logits, tc, ignore_index=IGNORE, reduction="sum")
                if want_h or want_w:
                    # d(sum of losses)/d logits = softmax − one-hot, zero on ignored rows
                    g = logits.softmax(-1)
                    valid = tc != IGNORE
                    g.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), -valid.unsqueeze(1).to(g.dtype))
                    g = (g * valid.unsqueeze(1)).to(dtype)
                    if want_h:
                        grad_h[start:start + chunk] = g @ w
                    if want_w:
                        grad_w += (g.T @ hc).float()
            ctx.save_for_backward(grad_h, grad_w, n_valid)
            ctx.dtypes = (hidden.dtype, weight.dtype)
            return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        dh = None if grad_h is None else (grad_h.float() * scale).to(ctx.dtypes[0])
        dw = None if grad_w is None else (grad_w * scale).to(ctx.dtypes[1])
        return dh, dw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` in nats, over the targets that are not
    IGNORE (-100). hidden (..., d), weight (V, d), targets (...). chunk: rows per pass (default: as many as
    make CHUNK_ELEMENTS logits)."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    dtype = _compute_dtype(hidden)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, t, chunk, dtype)
    with torch.autocast(device_type=h.device.type, enabled=False):  # evaluation: the loss alone, chunked
        w = weight.to(dtype)
        total = sum(F.cross_entropy((h[i:i + chunk].to(dtype) @ w.T).float(), t[i:i + chunk], ignore_index=IGNORE,
                                    reduction="sum") for i in range(0, h.shape[0], chunk))
        return total / (t != IGNORE).sum().clamp(min=1)
