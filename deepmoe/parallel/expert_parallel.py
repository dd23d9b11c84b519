"""Expert parallelism: the routed experts split over the ranks of an `ep` group, tokens sent to them and
their outputs brought back with all-to-all.

Each of the `ep` ranks holds E / ep consecutive experts (rank r: experts r·E/ep …). One layer call, for the
N tokens routed on this rank, each to k experts:
1. sort the N·k token copies by expert id, so the copies bound for each rank are one contiguous block;
2. exchange the per-expert counts (one all-to-all of E integers) and read them back to the host: the
   split sizes the two data all-to-alls need. This is the call's one host synchronisation;
3. dispatch: all-to-all the copies; the rows received come grouped by source rank, then by local expert;
4. regroup them by local expert (a stable sort on device) and run the local experts as grouped GEMMs,
   the same `grouped_mm` the single-device `Experts` uses;
5. combine: undo the regrouping, all-to-all the outputs back (split sizes swapped), undo the sort, and sum
   each token's k outputs times their routing weights in fp32.
Backward runs the two data all-to-alls in reverse with the split sizes already known: no host read. The
routing weights are applied on the token's own rank after the combine (the single-device path scales the
down projection's input instead; the same sum, rounded differently in the last bits).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..model.experts import NO_UPDATES, Experts, Updates, count_experts, grouped_mm

_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the gradient goes back along the same routes, split sizes swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows of x (sum(in_splits), ...) sent in_splits[j] to rank j; → the rows received, out_splits[j] from j."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def expert_parallel_ffn(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_w: torch.Tensor,
                        up_w: torch.Tensor, down_w: torch.Tensor, group) -> torch.Tensor:
    """Σ_j weights[:, j] · expert_{indices[:, j]}(x) for x (N, d), indices/weights (N, k), where this rank
    holds experts [rank·L, (rank+1)·L) of the group as gate_w/up_w (L, inter, d), down_w (L, d, inter).
    Every rank of `group` must call it (with its own tokens, possibly none) the same number of times."""
    N, k = indices.shape
    ep, L = dist.get_world_size(group), gate_w.shape[0]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)  # copies grouped by expert, hence by destination rank
    counts = count_experts(flat, ep * L)  # (E,) copies this rank sends to each expert
    # recv[s·L + e]: copies rank s sends to my local expert e
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)
    send_splits, recv_splits = torch.stack([counts.view(ep, L).sum(1), recv.view(ep, L).sum(1)]).tolist()
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover _grouped_mm: cast as it would
        dt = torch.get_autocast_dtype(x.device.type)
        x, gate_w, up_w, down_w = x.to(dt), gate_w.to(dt), up_w.to(dt), down_w.to(dt)
    xs = x.index_select(0, order // k)  # (N·k, d) sorted by expert
    xr = all_to_all(xs, recv_splits, send_splits, group)  # (R, d): by source rank, then local expert
    local = torch.arange(L, device=x.device).repeat(ep)  # the local expert of each (source, expert) block
    regroup = torch.repeat_interleave(local, recv, output_size=xr.shape[0]).argsort(stable=True)
    local_counts = recv.view(ep, L).sum(0)  # (L,)
    xe = xr.index_select(0, regroup)  # (R, d) by local expert
    h = F.silu(grouped_mm(xe, gate_w, local_counts)) * grouped_mm(xe, up_w, local_counts)
    ye = grouped_mm(h, down_w, local_counts)  # (R, d)
    ys = all_to_all(ye.index_select(0, _inverse(regroup)), send_splits, recv_splits, group)  # (N·k, d), `order`
    y = ys.index_select(0, _inverse(order)).view(N, k, -1)  # copy j of token n at n·k + j
    return (y.float() * weights.float().unsqueeze(-1)).sum(1).to(x.dtype)


class ExpertParallelExperts(nn.Module):
    """Drop-in for a MoE layer's `Experts` holding only this rank's E / ep experts. The weights keep their
    names and are DTensors sharded on the expert dimension over the `ep` mesh, so a state dict (gathered, or
    saved by torch.distributed.checkpoint) sees the single-device model's shapes and names."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        self.n_experts = experts.n_experts
        ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
        L = self.n_experts // ep
        self.group = ep_mesh.get_group()
        for name in _WEIGHTS:
            full = getattr(experts, name)
            # every rank built the same model, so each one's slice is already the shard: no communication
            local = full.detach()[rank * L:(rank + 1) * L].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False),
                                             requires_grad=full.requires_grad))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, capacity: int | None = None,
                sync_free: bool = False, updates: Updates = NO_UPDATES) -> torch.Tensor:
        if capacity is not None:
            raise ValueError("capacity dropping is not implemented with expert parallelism (--ep > 1): it would "
                             "rank each expert's copies across ranks; train dropless")
        if sync_free:
            raise ValueError("expert parallelism reads its all-to-all split sizes on the host: it is not sync-free")
        if any(u is not None for u in updates):
            raise ValueError("low-rank expert updates (LoRA) are not implemented with expert parallelism")
        # FSDP has all-gathered the dp_shard dimension; what is left is this rank's (L, ...) experts
        gate_w, up_w, down_w = (getattr(self, n).to_local() for n in _WEIGHTS)
        return expert_parallel_ffn(x, indices, weights, gate_w, up_w, down_w, self.group)
