"""Quantised modules that replace a built model's projections: `QuantLinear` and `QuantExperts`.

Both hold the codes and fp32 group scales as buffers (int8 (…, out, in) or packed int4 (…, out, in/2),
see scheme.py) and compute dequantise-then-matmul as the reference. On CUDA with Triton, products run
through kernels/quant_matmul.py, which reads the codes in place (for at most 16 rows, and for gathered
rows; more plain rows keep the reference, see there); on CPU, `prepare_cpu` switches on the ATen
weight-only kernels (cpu.py) where they fit and agree with that reference. `use_reference` turns both off.

Routed experts dequantise only the experts a call uses, one at a time (per call and layer: reading each
active expert's codes and writing its weights once in the activation dtype, ~(2 + 4)·out·in bytes for
fp32); all experts are never held dequantised. The capturable (sync-free) form multiplies every token
copy by its chosen expert: the gathered kernel on CUDA reads that expert's codes, the reference
dequantises it (k dequantisations per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import count_experts, drop_over_capacity
from . import cpu
from .scheme import QuantError, QuantScheme, decode, encode


class QuantWeight(nn.Module):
    """Codes + scales of one weight (out, in) or of stacked weights (E, out, in)."""

    def __init__(self, shape: tuple[int, ...], scheme: QuantScheme, name: str = "weight"):
        super().__init__()
        *lead, out_f, in_f = shape
        self.bits, self.in_features, self.out_features = scheme.bits, in_f, out_f
        G = in_f // scheme.group_for(in_f, name)
        codes = torch.int8 if scheme.bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(*lead, out_f, scheme.packed_cols(in_f), dtype=codes))
        self.register_buffer("scales", torch.ones(*lead, out_f, G, dtype=torch.float32))
        self.int4_cpu: list | None = None  # per weight: the int4 kernel's (weights, scale-zero), or None
        self.int8_cpu = False
        # the Triton kernel: None = on CUDA where Triton imports, False = never (the reference), True = always
        # (on CPU only under TRITON_INTERPRET=1: how the tests run it without a GPU)
        self.kernel: bool | None = None

    def dequantized(self, index: int | torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, s = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
        return decode(q, s, self.bits, dtype)

    def matmul(self, x: torch.Tensor, index: int | torch.Tensor | None = None) -> torch.Tensor:
        """x (M, in) times the weight transposed → (M, out): the weight, expert `index`'s weight, or with
        index a (M,) tensor, row m times expert index[m]'s weight (gathered, static shapes)."""
        no_grad = not (torch.is_grad_enabled() and x.requires_grad)  # the kernels have no backward
        if no_grad and self._kernel_runs(x):
            from ..kernels.quant_matmul import quant_matmul  # Triton loads only where the kernel runs

            if isinstance(index, torch.Tensor):  # gathered: the kernel indexes the stacked codes per row
                return quant_matmul(x, self.qweight, self.scales, self.bits, index, use_triton=self.kernel)
            q, s = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
            return quant_matmul(x, q, s, self.bits, use_triton=self.kernel)
        if isinstance(index, torch.Tensor):  # the same product as kernels.quant_matmul_reference
            return (x.unsqueeze(1) @ self.dequantized(index, x.dtype).mT).squeeze(1)
        if x.device.type == "cpu" and no_grad:
            if self.int8_cpu:
                q, s = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
                return cpu.int8_mm(x, q, s)
            if self.int4_cpu is not None and x.shape[0] == 1:  # see cpu.py: slower for several rows
                kernel = self.int4_cpu[0 if index is None else index]
                if kernel is not None:
                    return cpu.int4_mm(x, *kernel)
        return x @ self.dequantized(index, x.dtype).T

    def _kernel_runs(self, x: torch.Tensor) -> bool:
        if self.kernel is not None:
            return self.kernel
        if not x.is_cuda or torch.compiler.is_compiling():  # compiled: not traced through (untested on a GPU)
            return False
        from ..kernels.quant_matmul import kernel_available

        return kernel_available()

    @torch.no_grad()
    def prepare_cpu(self) -> int:
        """Switch on the CPU kernels where they fit and agree with the reference; → weights switched."""
        self.int8_cpu, self.int4_cpu = False, None
        if self.qweight.device.type != "cpu":
            return 0
        stacked = self.qweight.dim() == 3
        indices = list(range(self.qweight.shape[0])) if stacked else [None]

        def pick(t, i):
            return t if i is None else t[i]

        if self.bits == 8:
            ok = self.scales.shape[-1] == 1 and all(cpu.agrees(lambda x, i=i: cpu.int8_mm(x, pick(self.qweight, i), pick(self.scales, i)),
                                lambda x, i=i: x @ self.dequantized(i).T, self.in_features) for i in indices[:1])
            self.int8_cpu = ok
            return len(indices) if ok else 0
        kernels = []
        for i in indices:
            k = cpu.int4_layout(pick(self.qweight, i), pick(self.scales, i))
            if k is not None and not cpu.agrees(lambda x, k=k: cpu.int4_mm(x, *k),
                                                lambda x, i=i: x @ self.dequantized(i).T, self.in_features):
                k = None
            kernels.append(k)
        self.int4_cpu = kernels
        return sum(k is not None for k in kernels)


class QuantLinear(nn.Module):
    """A bias-free nn.Linear with quantised weight. `weight` is the dequantised matrix (what absorbed
    attention views per head), computed on each access in the model's dtype: an empty buffer of that dtype
    follows `.to(dtype)` (which casts the fp32 scales too)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, name: str = "weight",
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant = QuantWeight((out_features, in_features), scheme, name)
        self.register_buffer("dtype_of_weight", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.quant.dequantized(dtype=self.dtype_of_weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.quant.matmul(x.reshape(-1, shape[-1]), None).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.quant.bits}"


class QuantExperts(nn.Module):
    """The routed experts (same call as model.experts.Experts) with quantised stacked weights."""

    def __init__(self, n_experts: int, d: int, inter: int, scheme: QuantScheme, name: str = "experts"):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = QuantWeight((n_experts, inter, d), scheme, f"{name}.gate_proj")
        self.up_proj = QuantWeight((n_experts, inter, d), scheme, f"{name}.up_proj")
        self.down_proj = QuantWeight((n_experts, d, inter), scheme, f"{name}.down_proj")

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, capacity: int | None = None,
                sync_free: bool = False, updates=(None, None, None)) -> torch.Tensor:
        """x (N, d), indices/weights (N, k) → (N, d); see Experts.forward."""
        if any(u is not None for u in updates):
            raise ValueError("low-rank (LoRA) updates on quantised experts are not supported")
        N, k = indices.shape
        flat, w = indices.reshape(-1), weights.reshape(-1)
        if sync_free:
            if capacity is not None:
                raise ValueError("capacity dropping keeps a data-dependent number of copies: not sync-free")
            xs = x.repeat_interleave(k, dim=0)  # (M, d), copy j of token n at n·k + j
            # each copy times its own expert's weight (gathered: static shapes, no host read)
            h = F.silu(self.gate_proj.matmul(xs, flat)) * self.up_proj.matmul(xs, flat)
            ys = self.down_proj.matmul(h, flat).float() * w.float().unsqueeze(-1)
            return ys.view(N, k, -1).sum(1).to(x.dtype)
        if capacity is None:
            order = flat.argsort(stable=True)
            counts = count_experts(flat, self.n_experts)
        else:
            order, counts = drop_over_capacity(flat, w, capacity, self.n_experts)
        token = order // k
        xs = x.index_select(0, token)  # (M, d), grouped by expert
        active = [(e, c) for e, c in enumerate(counts.tolist()) if c]  # one host read per call

        def project(h: torch.Tensor, stack: QuantWeight) -> torch.Tensor:
            out, start = h.new_empty(h.shape[0], stack.out_features), 0
            for e, c in active:
                out[start:start + c] = stack.matmul(h[start:start + c], e)
                start += c
            return out

        h = F.silu(project(xs, self.gate_proj)) * project(xs, self.up_proj)
        h = (h.float() * w[order].unsqueeze(-1)).to(h.dtype)
        ys = project(h, self.down_proj)
        out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, ys.float()).to(x.dtype)


def prepare_cpu(model: nn.Module) -> dict[str, int]:
    """Switch every quantised weight of a model on CPU to the fast kernels where they apply;
    → {"weights": quantised weights, "fast": those on a fast kernel} (experts count one per expert)."""
    total = fast = 0
    for m in model.modules():
        if isinstance(m, QuantWeight):
            total += m.qweight.shape[0] if m.qweight.dim() == 3 else 1
            fast += m.prepare_cpu()
    return {"weights": total, "fast": fast}


def use_reference(model: nn.Module) -> None:
    """Switch every quantised weight back to dequantise-then-matmul (what the fast paths are tested against):
    no CPU kernels, no Triton kernel."""
    for m in model.modules():
        if isinstance(m, QuantWeight):
            m.int8_cpu, m.int4_cpu, m.kernel = False, None, False


def use_kernel(model: nn.Module, on: bool | None = True) -> None:
    """Set every quantised weight's Triton switch: True forces the kernel (on CPU only under
    TRITON_INTERPRET=1), None restores the default (CUDA only)."""
    for m in model.modules():
        if isinstance(m, QuantWeight):
            m.kernel = on


@torch.no_grad()
def set_weight(qw: QuantWeight, w: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> None:
    stored, scales = encode(w, scheme, name)
    qw.qweight.copy_(stored)
    qw.scales.copy_(scales)


def swap_modules(model: nn.Module, names: set[str], scheme: QuantScheme) -> None:
    """Replace the named modules (nn.Linear without bias, or routed Experts) by their quantised
    counterparts, on the same device, codes zero (filled by loading or `set_weight`)."""
    from ..model.experts import Experts

    for name in sorted(names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        device = next(iter(old.parameters())).device
        with torch.device(device):
            if isinstance(old, nn.Linear):
                if old.bias is not None:
                    raise QuantError(f"{name}: quantising a Linear with a bias is not supported")
                new = QuantLinear(old.in_features, old.out_features, scheme, name, old.weight.dtype)
            elif isinstance(old, Experts):
                E, inter, d = old.gate_proj.shape
                new = QuantExperts(E, d, inter, scheme, name)
            else:
                raise QuantError(f"{name} is a {type(old).__name__}; only Linear layers and routed experts "
                                 f"are quantised")
        setattr(parent, attr, new)
