"""A parallelism plan on paper: parameters, memory and all-to-all traffic per GPU for a run split into
pipeline stages (pp), data-parallel replicas (dp, ZeRO stage 0-3; FSDP's full sharding is stage 3) and
expert-parallel groups (ep), with no tensor parallelism. Arithmetic from the config's shapes only: nothing
here is measured, and nothing here imports torch.

The layout is DeepSeek-V3's (and torchtitan's): world = pp × dp. Within one pipeline stage the dp ranks
each hold the attention, dense and shared-expert weights, while the routed experts are split over ep of
those ranks, so each routed expert has dp / ep replicas and that is the group its ZeRO shards span.
DeepSeek-V3's "PP16 × EP64 × ZeRO-1 DP" on 2048 GPUs is pp=16, dp=128, ep=64 (2 replicas per expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import ModelConfig

BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}
ACT = BYTES["bf16"]  # saved activations are bf16 (DeepSeek caches some in FP8; not modelled, see docs/scale.md)
FP8_BLOCK = 128  # one fp32 scale per 128×128 weight block and per 1×128 activation tile (DeepSeek's recipe)
PLAN_KEYS = ("pp", "ep", "dp", "zero")


class PlanError(ValueError):
    """A parallel plan the model cannot be split by."""


@dataclass(frozen=True)
class ParallelPlan:
    pp: int = 1
    ep: int = 1
    dp: int = 1  # data-parallel ranks per stage; ep of them share out the routed experts
    zero: int = 1  # 0 replicates everything; 1 shards optimizer state, 2 also gradients, 3 (FSDP) also weights
    seq_len: int = 4096
    micro_batch: int = 1  # sequences per micro-batch
    global_batch: int | None = None  # sequences per optimizer step; None: pp micro-batches per pipeline
    in_flight: int | None = None  # micro-batches whose activations a stage holds; None: 1F1B's pp - stage
    weights: str = "bf16"  # GEMM weights (and the dispatched activations): bf16 or fp8
    grads: str = "fp32"
    moments: str = "fp32"  # AdamW's two moments; master weights are always fp32
    gpus_per_node: int = 8

    @property
    def world(self) -> int:
        return self.pp * self.dp

    @property
    def expert_replicas(self) -> int:
        return self.dp // self.ep

    @property
    def batch(self) -> int:
        return self.global_batch or self.dp * self.micro_batch * self.pp

    def validate(self, cfg: ModelConfig) -> None:
        for name in ("pp", "ep", "dp", "seq_len", "micro_batch", "gpus_per_node"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise PlanError(f"{name} must be a positive integer, got {v!r}")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"zero must be 0, 1, 2 or 3 (FSDP's full sharding is 3), got {self.zero!r}")
        for name, allowed in (("weights", ("bf16", "fp8")), ("grads", ("fp32", "bf16")),
                              ("moments", ("fp32", "bf16"))):
            if getattr(self, name) not in allowed:
                raise PlanError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        if self.pp > L:
            raise PlanError(f"pp={self.pp} is more pipeline stages than the model's {L} layers: "
                            f"use pp <= {L}")
        E = cfg.n_routed_experts or 0
        if self.ep > 1 and not E:
            raise PlanError(f"ep={self.ep} needs routed experts; this model is dense: use ep=1")
        if E and E % self.ep:
            fits = [n for n in (2**i for i in range(12)) if E % n == 0 and n <= self.dp]
            raise PlanError(f"ep={self.ep} does not divide the {E} routed experts: every expert-parallel rank must "
                            f"hold the same number; try ep in {{{', '.join(map(str, fits))}}}")
        if self.dp % self.ep:
            raise PlanError(f"ep={self.ep} must divide dp={self.dp}: the expert-parallel group is made of one "
                            f"stage's data-parallel ranks (dp = ep × replicas of each expert)")
        if self.global_batch is not None and self.global_batch % (self.dp * self.micro_batch):
            raise PlanError(f"global batch {self.global_batch} must be a multiple of dp × micro-batch = "
                            f"{self.dp} × {self.micro_batch}")
        if self.in_flight is not None and self.in_flight < 1:
            raise PlanError(f"in_flight must be >= 1, got {self.in_flight}")
        if D and -(-(L + D) // self.pp) < D:  # the last stage holds every MTP depth
            raise PlanError(f"pp={self.pp} leaves the last stage fewer slots than the {D} MTP depths")


def parse_plan(spec: str) -> dict[str, int]:
    """'pp=16,ep=64,dp=128[,zero=1]' → {'pp': 16, 'ep': 64, 'dp': 128, 'zero': 1}."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in PLAN_KEYS:
            raise PlanError(f"cannot read {item!r} in plan {spec!r}: write KEY=N with KEY one of "
                            f"{', '.join(PLAN_KEYS)}, e.g. pp=16,ep=64,dp=128")
        if key in out:
            raise PlanError(f"{key} is given twice in plan {spec!r}")
        try:
            out[key] = int(value)
        except ValueError:
            raise PlanError(f"{key}={value!r} in plan {spec!r}: expected an integer") from None
    if not out:
        raise PlanError("empty plan: give at least one of pp=, ep=, dp= (e.g. pp=16,ep=64,dp=128)")
    return out


# ---- parameters ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    """Parameter counts split by how they are stored: `gemm` weights (FP8 when the plan says so), `other`
    (embedding, head, norms, router, biases: DeepSeek keeps these in bf16 or fp32) and `routed` experts."""
    gemm: int = 0
    other: int = 0
    routed: int = 0

    def __add__(self, o: "Params") -> "Params":
        return Params(self.gemm + o.gemm, self.other + o.other, self.routed + o.routed)

    @property
    def total(self) -> int:
        return self.gemm + self.other + self.routed


def attention_params(cfg: ModelConfig) -> Params:
    d, H, r, rope = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    bias = cfg.attention_bias  # on q_a_proj, kv_a_proj_with_mqa and o_proj only, as in the model
    if cfg.q_lora_rank is None:
        q = Params(gemm=d * H * cfg.qk_head_dim)
    else:
        ql = cfg.q_lora_rank
        q = Params(gemm=d * ql + ql * H * cfg.qk_head_dim, other=ql + ql * bias)  # q_a_layernorm
    kv = Params(gemm=d * (r + rope) + r * H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                other=r + (r + rope) * bias)  # kv_a_layernorm
    o = Params(gemm=H * cfg.v_head_dim * d, other=d * bias)
    return q + kv + o


def layer_params(cfg: ModelConfig, i: int) -> Params:
    """Block i (i >= num_hidden_layers: an MTP depth's block): attention, two norms and its MLP or MoE."""
    d = cfg.hidden_size
    p = attention_params(cfg) + Params(other=2 * d)
    if not cfg.is_moe_layer(i):
        return p + Params(gemm=3 * d * cfg.intermediate_size)
    E, m = cfg.n_routed_experts, cfg.moe_intermediate_size
    shared = 3 * d * m * (cfg.n_shared_experts or 0)
    return p + Params(gemm=shared, other=E * d, routed=3 * E * d * m)  # other: the router's (E, d) weight


def mtp_params(cfg: ModelConfig, depth: int) -> Params:
    """MTP depth's own parameters (embedding and head are the main model's): enorm, hnorm, eh_proj, a block,
    shared_head.norm."""
    d = cfg.hidden_size
    return Params(gemm=2 * d * d, other=3 * d) + layer_params(cfg, cfg.num_hidden_layers + depth - 1)


def model_counts(cfg: ModelConfig) -> dict[str, int]:
    """Totals from the same arithmetic the plan uses (tests check them against the built module tree).
    `activated_deepseek` leaves out the input embedding, a table lookup rather than a matmul: that is how
    DeepSeek's published figures come out (V3 37B, V2 21B, V2-Lite 2.4B)."""
    V, d = cfg.vocab_size, cfg.hidden_size
    blocks = Params()
    for i in range(cfg.num_hidden_layers):
        blocks = blocks + layer_params(cfg, i)
    vocab = V * d * (1 if cfg.tie_word_embeddings else 2)
    total = blocks.total + vocab + d  # + the final norm
    k, E = cfg.num_experts_per_tok or 0, cfg.n_routed_experts or 1
    activated = total - blocks.routed + blocks.routed * k // E
    mtp = sum(mtp_params(cfg, k).total for k in range(1, cfg.num_nextn_predict_layers + 1))
    return dict(total=total, activated=activated,
                activated_deepseek=activated - (0 if cfg.tie_word_embeddings else V * d), mtp=mtp)


# ---- pipeline stages -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    index: int
    layers: range  # main-model layers
    mtp: int  # MTP depths here (all on the last stage: they read its final hidden state and the head)
    first: bool
    last: bool

    def params(self, cfg: ModelConfig) -> Params:
        d, V = cfg.hidden_size, cfg.vocab_size
        p = Params()
        for i in self.layers:
            p = p + layer_params(cfg, i)
        for k in range(1, self.mtp + 1):
            p = p + mtp_params(cfg, k)
        # vocabulary matrices: the embedding on the first stage, final norm + head on the last; with MTP the
        # last stage also embeds tokens i+k, so it keeps a copy of the embedding whose gradient is summed with
        # the first stage's (Megatron's way with tied embeddings). A tied head serves as that copy.
        mats = int(self.first)
        if self.last:
            mats += 0 if (self.first and cfg.tie_word_embeddings) else 1
            mats += int(self.mtp > 0 and not self.first and not cfg.tie_word_embeddings)
            p = p + Params(other=d)
        return p + Params(other=mats * V * d)

    def moe_layers(self, cfg: ModelConfig) -> int:
        L = cfg.num_hidden_layers
        return (sum(cfg.is_moe_layer(i) for i in self.layers)
                + sum(cfg.is_moe_layer(L + k - 1) for k in range(1, self.mtp + 1)))

    def describe(self) -> str:
        parts = [f"{self.layers.start}-{self.layers.stop - 1}" if len(self.layers) > 1
                 else str(self.layers.start) if self.layers else ""]
        parts += ["emb"] if self.first else []
        parts += [f"MTP{'×' + str(self.mtp) if self.mtp > 1 else ''}"] if self.mtp else []
        parts += ["head"] if self.last else []
        return " + ".join(p for p in parts if p)


def stage_layout(cfg: ModelConfig, pp: int) -> list[Stage]:
    """Layers as evenly as they go, the MTP depths counting as layers of the last stage. The stages that get
    one layer fewer are the two ends first: they also hold the embedding, and the head and loss."""
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    base, extra = divmod(L + D, pp)
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 2 else list(range(pp))
    sizes = [base + (s in order[:extra]) for s in range(pp)]
    sizes[-1] -= D
    stages, start = [], 0
    for s, n in enumerate(sizes):
        stages.append(Stage(s, range(start, start + n), D if s == pp - 1 else 0, s == 0, s == pp - 1))
        start += n
    return stages


# ---- activations (bytes per token, saved for the backward pass) -----------------------------------------
# Training runs MLA in its naive form with a flash-style attention kernel (it saves q, k, v, the output and a
# log-sum-exp per head, never the T×T scores). RMSNorm's backward reads its input; a Linear's weight gradient
# reads its input; RoPE's backward needs only cos/sin; SwiGLU is fused (it saves gate and up, recomputes
# silu). Counted in elements, then ACT bytes each (fp32 tensors count as two).
def attention_activations(cfg: ModelConfig) -> int:
    d, H = cfg.hidden_size, cfg.num_attention_heads
    n = 2 * d  # input_layernorm's input and output (the output feeds the q and kv projections)
    if cfg.q_lora_rank is not None:
        n += 2 * cfg.q_lora_rank  # q_a_layernorm's input and output (q_b_proj's input)
    n += 2 * cfg.kv_lora_rank  # kv_a_layernorm's input and output c_kv (kv_b_proj's input)
    n += 2 * H * cfg.qk_head_dim  # q and k after RoPE; k has the shared k_pe broadcast into every head
    n += 2 * H * cfg.v_head_dim  # v and the attention output (o_proj's input)
    n += 2 * H  # fp32 log-sum-exp per head
    return n * ACT


def mlp_activations(cfg: ModelConfig, i: int) -> int:
    d = cfg.hidden_size
    n = 2 * d  # post_attention_layernorm's input and output
    if not cfg.is_moe_layer(i):
        return (n + 3 * cfg.intermediate_size) * ACT  # gate, up, their product (down_proj's input)
    E, k, m = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    n += 2 * E + 2 * k + 4 * k  # fp32 sigmoid/softmax scores, fp32 top-k weights, int64 expert ids
    n += k * d  # the k dispatched copies (the experts' gate/up weight gradients read them)
    n += 3 * k * m  # per copy: gate, up, product
    n += k * d  # expert outputs (the combine's weight gradient reads them)
    n += 3 * m * (cfg.n_shared_experts or 0)  # the shared expert (its input is the norm's output above)
    return n * ACT


def layer_activations(cfg: ModelConfig, i: int) -> int:
    return attention_activations(cfg) + mlp_activations(cfg, i)


def mtp_activations(cfg: ModelConfig, depth: int) -> int:
    # enorm's input (the embedding), hnorm's input (the previous depth's hidden state), their concatenation
    # (eh_proj's input), then a block
    return 4 * cfg.hidden_size * ACT + layer_activations(cfg, cfg.num_hidden_layers + depth - 1)


# ---- memory per GPU ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageMemory:
    stage: Stage
    params: int  # on each GPU before ZeRO-3 sharding: everything but the routed experts, + routed / ep
    routed: int  # the routed-expert part of params
    weights: float  # bytes
    grads: float
    optimizer: float  # fp32 master weights + two AdamW moments
    gather: float  # ZeRO-3: two layers' unsharded weights (the one computing, the one prefetched)
    activations: float  # no activation checkpointing
    activations_ckpt: float  # every layer checkpointed
    in_flight: int

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.gather

    @property
    def total(self) -> float:
        return self.static + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.static + self.activations_ckpt


def stage_memory(cfg: ModelConfig, plan: ParallelPlan, stage: Stage) -> StageMemory:
    p = stage.params(cfg)
    shared, routed = p.gemm + p.other, p.routed // plan.ep
    gemm_b = BYTES[plan.weights] + (4 / FP8_BLOCK**2 if plan.weights == "fp8" else 0)
    opt_b = BYTES["fp32"] + 2 * BYTES[plan.moments]

    def sharded(bytes_shared: float, bytes_routed: float, stage_min: int) -> float:
        # ZeRO splits a tensor over the ranks that hold the same copy: all dp for shared weights, the dp / ep
        # replicas of each routed expert
        if plan.zero < stage_min:
            return bytes_shared + bytes_routed
        return bytes_shared / plan.dp + bytes_routed / plan.expert_replicas

    weights = sharded((p.gemm) * gemm_b + p.other * BYTES["bf16"], routed * gemm_b, 3)
    grads = sharded(shared * BYTES[plan.grads], routed * BYTES[plan.grads], 2)
    optimizer = sharded(shared * opt_b, routed * opt_b, 1)
    gather = 0.0
    if plan.zero == 3:
        units = [layer_params(cfg, i) for i in stage.layers] + [mtp_params(cfg, k) for k in range(1, stage.mtp + 1)]
        big = max((u.gemm + u.routed / plan.ep) * gemm_b + u.other * BYTES["bf16"] for u in units)
        gather = 2 * big

    T = plan.micro_batch * plan.seq_len
    n = plan.in_flight or plan.pp - stage.index  # 1F1B: stage s has started pp - s forwards before a backward
    acts = ([layer_activations(cfg, i) for i in stage.layers]
            + [mtp_activations(cfg, k) for k in range(1, stage.mtp + 1)])
    # checkpointing keeps each block's input (2d for an MTP depth: its hidden-state and embedding inputs) and
    # rebuilds one block's full set at a time during the backward
    kept = [cfg.hidden_size * ACT] * len(stage.layers) + [2 * cfg.hidden_size * ACT] * stage.mtp
    full, ckpt = n * T * sum(acts), n * T * sum(kept) + T * max(acts)
    if stage.last:
        # final norm's input and output (the head's input) stay outside any checkpoint; the loss holds fp32
        # logits (their gradient overwrites them) for the one micro-batch in its backward, main + MTP depths
        head = n * T * 2 * cfg.hidden_size * ACT + T * cfg.vocab_size * (1 + stage.mtp) * BYTES["fp32"]
        full, ckpt = full + head, ckpt + head
    return StageMemory(stage, shared + routed, routed, weights, grads, optimizer, gather, full, ckpt, n)


# ---- all-to-all ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllToAll:
    copies: int  # top-k: copies of each token's hidden state sent to experts
    dispatch: int  # bytes per token per MoE layer, all k copies, in the dispatch dtype (+ FP8 scales)
    combine: int  # bytes per token per MoE layer, the k expert outputs back, bf16
    off_gpu: float  # expected fraction of copies bound for another GPU when load is balanced: (ep - 1) / ep
    nodes: int  # most nodes one token's copies reach (node-limited routing when groups map onto nodes)
    remote_nodes: int  # of which other than the token's own
    ib_dispatch: int  # most bytes per token per layer over the inter-node network: one copy per remote node,
    ib_combine: int  # fanned out (summed, for combine) over NVLink inside the node, as DeepSeek's kernels do
    step_gpu: float  # bytes one GPU of the busiest stage sends off-GPU per step, forward + backward
    step_gpu_ckpt: float  # + the forward again when checkpointed layers are recomputed
    step_total: float  # all GPUs, forward + backward


def all_to_all(cfg: ModelConfig, plan: ParallelPlan, stages: list[Stage]) -> AllToAll | None:
    if not cfg.has_moe:
        return None
    d, E, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    # FP8 GEMMs consume FP8 inputs, so DeepSeek quantizes before dispatching (1×128 tiles, one fp32 scale
    # each); expert outputs come back in bf16 to be summed
    if plan.weights == "fp8":
        per_copy = d + 4 * math.ceil(d / FP8_BLOCK)
    else:
        per_copy = d * BYTES["bf16"]
    back = d * BYTES["bf16"]
    ep_nodes = math.ceil(plan.ep / plan.gpus_per_node)
    per_node = E // plan.ep * min(plan.ep, plan.gpus_per_node)
    limit = k
    g = cfg.n_group or 1
    if cfg.topk_method != "greedy" and g > 1:
        # a token's experts lie in topk_group groups; a group of E/g consecutive experts spans this many nodes
        size = E // g
        span = math.ceil(size / per_node) + (1 if size % per_node and per_node % size else 0)
        limit = min(limit, (cfg.topk_group or 1) * span)
    nodes = min(k, ep_nodes, limit)
    remote = min(nodes, ep_nodes - 1)
    off = (plan.ep - 1) / plan.ep
    # the backward mirrors the forward: output gradients travel to the experts (DeepSeek sends them in FP8
    # too) and input gradients come back in bf16
    exchange = k * (per_copy + back) * off
    tokens_gpu = plan.batch * plan.seq_len / plan.dp
    busiest = max(s.moe_layers(cfg) for s in stages)
    step_gpu = 2 * tokens_gpu * busiest * exchange
    moe_total = sum(s.moe_layers(cfg) for s in stages)
    return AllToAll(k, k * per_copy, k * back, off, nodes, remote, remote * per_copy, remote * back,
                    step_gpu, step_gpu * 1.5, 2 * plan.batch * plan.seq_len * moe_total * exchange)


# ---- the plan --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanReport:
    cfg: ModelConfig
    plan: ParallelPlan
    stages: list[StageMemory]
    a2a: AllToAll | None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def worst_ckpt(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total_ckpt)


def make_plan(cfg: ModelConfig, plan: ParallelPlan) -> PlanReport:
    plan.validate(cfg)
    stages = stage_layout(cfg, plan.pp)
    return PlanReport(cfg, plan, [stage_memory(cfg, plan, s) for s in stages], all_to_all(cfg, plan, stages),
                      model_counts(cfg))
