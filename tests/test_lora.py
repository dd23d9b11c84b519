"""LoRA on a built model: a fresh adapter changes nothing, only the adapter trains, every forward form
(naive, absorbed, the paged engine) sees the update, merging folds it in exactly, targets are checked."""

import pytest
import torch

from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.lora import LoraConfig, LoraExperts, LoraLinear, apply_lora, merge_lora, trainable_parameters
from deepmoe.lora.layers import LoraEmbedding, LoraRouter
from deepmoe.model import build_model
from deepmoe.tokenizer import train_bpe

from .conftest import naive_greedy, rel_err, v2_config, v3_config

CONFIGS = pytest.mark.parametrize("make_cfg", [v2_config, v3_config], ids=["v2", "v3"])
EVERYTHING = ("all-linear", "experts", "gate", "embed_tokens", "lm_head")


def _randomize_b(model, seed=3, std=0.05):
    """A trained-looking adapter: the zero factor (B; the embedding's A) away from its zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_B", "lora_embedding_A")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _ids(n=2, T=16, seed=1):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(seed))


@CONFIGS
def test_fresh_adapter_gives_exactly_the_base_logits(make_cfg):
    model = build_model(make_cfg(), seed=0).eval()
    x = _ids()
    with torch.no_grad():
        base = [model(x), model(x, absorb=True)]
        apply_lora(model, LoraConfig(rank=4, alpha=8, targets=EVERYTHING))
        assert torch.equal(model(x), base[0]) and torch.equal(model(x, absorb=True), base[1])


@CONFIGS
def test_only_the_adapter_trains(make_cfg):
    model = build_model(make_cfg(), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = apply_lora(model, LoraConfig(rank=4, alpha=8, targets=EVERYTHING, dropout=0.1))
    _randomize_b(model)  # with B = 0 the gradient of A is exactly zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))
                             for n in trainable)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = _ids(4, 24)
    losses = []
    for _ in range(8):  # one fixed batch: the adapter alone must be able to fit it
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) == trainable and all(g.abs().max() > 0 for g in grads.values())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for name, p in model.named_parameters():  # base weights bit-identical after training
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name


@CONFIGS
def test_absorbed_attention_and_merge_see_the_update(make_cfg):
    """kv_b_proj's adapter must reach absorbed attention (which reads the matrix, not the layer), and merging
    must give the adapter's logits (≤ 1e-5 in fp32) with plain layers back in place."""
    model = build_model(make_cfg(), seed=0).eval()
    x = _ids()
    with torch.no_grad():
        base = model(x)
        apply_lora(model, LoraConfig(rank=4, alpha=8, targets=EVERYTHING))
        _randomize_b(model)
        adapted = model(x)
        assert rel_err(adapted, base) > 1e-2  # the adapter matters
        assert rel_err(adapted, model(x, absorb=True)) <= 1e-5
        merge_lora(model)
        assert not any(isinstance(m, (LoraLinear, LoraEmbedding, LoraExperts)) for m in model.modules())
        assert rel_err(adapted, model(x)) <= 1e-5 and rel_err(adapted, model(x, absorb=True)) <= 1e-5


def test_engine_decodes_an_unmerged_adapter_like_the_definition():
    """The serving engine on a model still carrying adapters (paged latent cache, absorbed attention, CPU decode
    layout, sync-free or grouped experts) decodes exactly the full-recompute greedy tokens."""
    model = build_model(v3_config(num_nextn_predict_layers=0), seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharp distributions: greedy ties cannot hide a wrong logit
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=EVERYTHING))
    _randomize_b(model, std=0.1)
    tok = train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(40)], 300)
    prompts = [list(range(5, 30)), [7, 8, 9], list(range(100, 117))]
    want = [naive_greedy(model, p, 8) for p in prompts]
    engine = LLMEngine(model, tok, kv_cache_bytes=2**22, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seqs = [engine.add(p, params, str(i)) for i, p in enumerate(prompts)]
    while engine.scheduler.has_unfinished():
        engine.step()
    assert [s.completion_token_ids for s in seqs] == want


def test_targets_select_layers_like_peft():
    model = build_model(v3_config(), seed=0)
    apply_lora(model, LoraConfig(rank=2, targets=("down_proj", "experts.gate_up_proj", "self_attn.kv_b_proj")))
    wrapped = {n: type(m) for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))}
    # a bare down_proj is the dense and shared-expert layers; the routed experts are only what is named
    assert wrapped == {
        "model.layers.0.mlp.down_proj": LoraLinear,
        **{f"model.layers.{i}.mlp.shared_experts.down_proj": LoraLinear for i in (1, 2)},
        **{f"model.layers.{i}.mlp.experts": LoraExperts for i in (1, 2)},
        **{f"model.layers.{i}.self_attn.kv_b_proj": LoraLinear for i in range(3)}}
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up is not None and experts.down is None
    assert all(not n.startswith("mtp.") for n, p in model.named_parameters() if p.requires_grad)  # main stack only
    routers = build_model(v3_config(), seed=0)
    apply_lora(routers, LoraConfig(rank=2, targets=("gate",)))
    assert isinstance(routers.model.layers[1].mlp.gate, LoraRouter)


def test_trainable_counts_are_the_factor_sizes():
    cfg = v3_config()
    model = build_model(cfg, seed=0)
    _, total = trainable_parameters(model)
    r, E, d, inter = 4, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    report = apply_lora(model, LoraConfig(rank=r, targets=("q_a_proj", "experts")))
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    want_q = cfg.num_hidden_layers * r * (d + cfg.q_lora_rank)
    want_experts = n_moe * E * r * ((d + 2 * inter) + (inter + d))
    assert report.by_kind == {"attention": want_q, "routed experts": want_experts}
    assert report.trainable == want_q + want_experts and report.total == total + report.trainable
    assert f"{report.trainable:,} trainable" in str(report)


@pytest.mark.parametrize("targets, message", [
    (("q_proj",), "'q_proj' match no layer"),  # V3 compresses queries: q_a_proj / q_b_proj
    (("all-linear", "experts.up_proj"), "'experts.up_proj' match no layer"),  # fused: experts.gate_up_proj
    (("all-linear", "mtp.0.eh_proj"), "'mtp.0.eh_proj' match no layer"),  # MTP modules are not adapted
])
def test_a_target_that_matches_nothing_is_an_error(targets, message):
    model = build_model(v3_config(), seed=0)
    with pytest.raises(ValueError, match=message) as e:
        apply_lora(model, LoraConfig(rank=2, targets=targets))
    assert "q_a_proj" in str(e.value) and "experts.gate_up_proj" in str(e.value)  # lists what exists
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing half-applied


def test_config_checks():
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets=())):
        with pytest.raises(ValueError):
            LoraConfig(**bad)
    assert LoraConfig(targets="q_a_proj, experts").targets == ("q_a_proj", "experts")  # a CLI string splits
    assert LoraConfig(targets=["q_a_proj"]).targets == ("q_a_proj",) and LoraConfig(rank=16).alpha == 32
    model = build_model(v3_config(), seed=0)
    apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(model, LoraConfig(rank=2))
