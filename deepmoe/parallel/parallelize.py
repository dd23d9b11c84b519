"""parallelize(model, mesh, cfg): turn a built single-device model into its distributed form, in place.

The order, bottom-up as FSDP2 wants it (each `fully_shard` takes the parameters no inner call took):
1. expert parallelism: every MoE layer's `Experts` is swapped for `ExpertParallelExperts` (ep > 1);
2. FSDP on the routed experts over `dp_shard`: the ranks that hold the same experts. Their gradients are
   sums over the tokens of the whole `ep` group, so they are divided by the world size, not by dp_shard,
   which makes every gradient that of the global mean loss;
3. under mixed precision, FSDP on each router over `dp`, computing in fp32 (routing logits must not see
   bf16 rounding: REFERENCE.md);
4. FSDP on each decoder block (main stack and MTP) over `dp`: attention, dense MLP or shared experts, norms;
5. FSDP on the root over `dp`: embedding, final norm, head and the MTP modules' own projections and norms.
Activation checkpointing wraps block forwards before this (train/transforms.py) and composes with it: the
recompute runs the inner FSDP units' hooks and the all-to-alls again, on every rank alike.
Parameter names do not change, so a gathered state dict is the single-device model's. On one rank nothing
is applied (see parallelize).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..model import DeepSeekModel
from ..model.block import Block
from ..model.moe import MoE
from .expert_parallel import ExpertParallelExperts
from .mesh import ParallelMesh


@dataclass(frozen=True)
class ParallelConfig:
    ep: int = 1  # expert-parallel size: ranks that split the routed experts (the mesh's "ep" dimension)
    # compute dtype of the FSDP-gathered weights (bf16 on CUDA); gradients are reduced in fp32 either way
    param_dtype: torch.dtype = torch.float32


def parallelize(model: DeepSeekModel, mesh: ParallelMesh, cfg: ParallelConfig) -> DeepSeekModel:
    """Apply expert parallelism and FSDP2 to `model` on `mesh` (from `build_mesh`); returns it."""
    dp, dp_shard, ep_mesh = mesh.dp, mesh.dp_shard, mesh.ep
    world = dp.size()
    if world == 1:
        # nothing to shard: FSDP would only copy every weight into its unsharded buffer and every gradient out
        # again, each step (measured 1.2x the plain step on CPU). The caller keeps the single-device precision
        # path (bf16 compute copies) instead; the reductions and checkpoints around it work on plain tensors.
        return model
    mixed = cfg.param_dtype != torch.float32
    compute = MixedPrecisionPolicy(param_dtype=cfg.param_dtype, reduce_dtype=torch.float32)
    # the router and the root take their inputs as they come: the router casts to fp32 itself, the root gets ids
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # gloo has no AVG or PREMUL_SUM reduction: sum, then divide after (the same result in fp32)
    sum_then_divide = mesh.device_type == "cpu"
    units: list[tuple[FSDPModule, int]] = []  # with the size of the mesh each one is sharded over
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if cfg.ep > 1:
            moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)
            experts = fully_shard(moe.experts, mesh=dp_shard, mp_policy=compute)
            experts.set_gradient_divide_factor(float(world))
            units.append((experts, dp_shard.size()))
        if mixed:
            units.append((fully_shard(moe.gate, mesh=dp, mp_policy=fp32), world))
    for block in (m for m in model.modules() if isinstance(m, Block)):
        units.append((fully_shard(block, mesh=dp, mp_policy=compute), world))
    # the root keeps fp32 weights: the embedding's output is the fp32 residual stream, and the head runs
    # under autocast like the single-device bf16 path
    units.append((fully_shard(model, mesh=dp, mp_policy=fp32), world))
    # the training loss calls hidden_states, not forward: FSDP must gather the root's weights for it too
    register_fsdp_forward_method(model, "hidden_states")
    for unit, size in units:
        # not on a mesh of one rank: there FSDP divides by the factor while copying, and forced summing
        # would divide a second time
        if sum_then_divide and size > 1:
            unit.set_force_sum_reduction_for_comms(True)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit back to its sharded parameters (the root stays gathered after a forward that no
    backward followed, e.g. validation): before reading parameters by name."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
