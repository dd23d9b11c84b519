"""GPU-only checks (skipped without CUDA): CUDA-graph decoding equals the eager engine, plain and speculative,
the decode and drafting steps make no host sync, the grouped-GEMM expert path equals the definition. Run by benchmarks/gpu_suite.py."""

import pytest
import torch

from deepmoe.engine.decode_step import StaticDecoder
from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.model import build_model
from deepmoe.model.experts import sync_free_experts
from deepmoe.tokenizer import train_bpe

from .conftest import naive_greedy, v3_config
from .test_experts import naive_experts

pytestmark = pytest.mark.cuda
PROMPTS = [list(range(5, 30)), [7, 8, 9], list(range(100, 117)), [3], list(range(40, 90))]


@pytest.fixture(scope="module")
def parts():
    cfg = v3_config(num_nextn_predict_layers=0, rope_scaling=None)
    model = build_model(cfg, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval(), train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(40)], 300)


def _generate(engine, lengths):
    seqs = [engine.add(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), str(i))
            for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    while engine.scheduler.has_unfinished():
        engine.step()
    return [s.completion_token_ids for s in seqs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decoding_equals_eager(parts, dtype):
    model, tok = parts
    gpu = build_model(model.config, device="cuda", dtype=dtype)
    gpu.load_state_dict(model.state_dict())
    lengths = [40, 33, 20, 9, 3]
    kw = dict(kv_cache_bytes=8 << 20, block_size=16, max_num_seqs=8)
    graphed = LLMEngine(gpu, tok, **kw)
    assert graphed.runner.decoder is not None and graphed.runner.decoder.mode == "graphs"
    got = _generate(graphed, lengths)
    eager = _generate(LLMEngine(gpu, tok, cuda_graphs=False, **kw), lengths)
    assert got == eager
    if dtype == torch.float32:
        assert got[1] == naive_greedy(model, PROMPTS[1], lengths[1])


def test_static_decode_step_makes_no_host_sync(parts):
    model, tok = parts
    gpu = build_model(model.config, device="cuda", dtype=torch.bfloat16)
    gpu.load_state_dict(model.state_dict())
    engine = LLMEngine(gpu, tok, kv_cache_bytes=8 << 20, block_size=16, max_num_seqs=4, decode_mode="static")
    decoder: StaticDecoder = engine.runner.decoder
    seq = engine.add(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "0")
    engine.step()  # prefill (general path: it may sync)
    decoder.run([seq.token_ids[-1:]], [len(seq) - 1], [seq.block_table])  # warm-up: lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hidden = decoder.run([seq.token_ids[-1:]], [len(seq) - 1], [seq.block_table])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hidden.shape == (1, 1, model.config.hidden_size) and torch.isfinite(hidden).all()


@pytest.fixture(scope="module")
def mtp_parts():
    cfg = v3_config(num_nextn_predict_layers=1, rope_scaling=None)
    model = build_model(cfg, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval(), train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(40)], 300)


def test_speculative_decoding_in_cuda_graphs_equals_eager(mtp_parts):
    """Verification (two queries per row) and MTP drafting replayed as graphs: the tokens, and the drafts
    proposed and accepted, equal the eager general path's."""
    model, tok = mtp_parts
    gpu = build_model(model.config, device="cuda", dtype=torch.float32)
    gpu.load_state_dict(model.state_dict())
    lengths = [40, 33, 20, 9, 3]
    kw = dict(kv_cache_bytes=8 << 20, block_size=16, max_num_seqs=8, speculative=True)
    graphed = LLMEngine(gpu, tok, **kw)
    assert graphed.runner.decoder.draft_tokens == 1 and ("draft", 8, 2) in graphed.runner.decoder.graphs
    eager = LLMEngine(gpu, tok, cuda_graphs=False, **kw)
    assert _generate(graphed, lengths) == _generate(eager, lengths)
    assert [graphed.num_drafted, graphed.num_accepted] == [eager.num_drafted, eager.num_accepted] != [0, 0]


def test_speculative_static_steps_make_no_host_sync(mtp_parts):
    model, tok = mtp_parts
    gpu = build_model(model.config, device="cuda", dtype=torch.bfloat16)
    gpu.load_state_dict(model.state_dict())
    engine = LLMEngine(gpu, tok, kv_cache_bytes=8 << 20, block_size=16, max_num_seqs=4, decode_mode="static",
                       speculative=True)
    decoder: StaticDecoder = engine.runner.decoder
    seq = engine.add(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "0")
    engine.step()  # prefill (general path: it may sync)
    args = ([seq.token_ids[-1:] + [5]], [len(seq) - 1], [seq.block_table])
    for check in (False, True):  # a warm-up (lazy initialisation), then the checked steps
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else "default")
        try:
            hidden = decoder.run(*args)
            drafted = decoder.draft([[5, 6]], *args[1:])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert hidden.shape == drafted.shape == (1, 2, model.config.hidden_size)
    assert torch.isfinite(hidden).all() and torch.isfinite(drafted).all()


@pytest.mark.parametrize("n_tokens", [1, 64])
def test_grouped_gemm_expert_path_matches_definition(n_tokens):
    cfg = v3_config()
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(16, cfg.moe_intermediate_size, cfg.hidden_size, generator=g) * 0.1,
         torch.randn(16, cfg.moe_intermediate_size, cfg.hidden_size, generator=g) * 0.1,
         torch.randn(16, cfg.hidden_size, cfg.moe_intermediate_size, generator=g) * 0.1]
    x = torch.randn(n_tokens, cfg.hidden_size, generator=g)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, 4, generator=g)

    class Ref:  # naive_experts reads the three stacked projections by name
        gate_proj, up_proj, down_proj = w

    ref = naive_experts(Ref, x, indices, weights)
    got = sync_free_experts(x.cuda().bfloat16(), indices.cuda(), weights.cuda(),
                            *(t.cuda().bfloat16() for t in w))
    torch.testing.assert_close(got.float().cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n_tokens", [1, 64])
@pytest.mark.parametrize("sync_free", [False, True], ids=["eager", "sync_free"])
def test_grouped_gemm_low_rank_updates_match_definition(n_tokens, sync_free):
    """LoRA updates of the experts on the CUDA grouped-GEMM path (rank 8: 16-byte rows in bf16) against the
    per-expert definition with W + scale·B·A formed."""
    from deepmoe.model.experts import Experts, LowRank

    from .test_experts_paths import naive_lora_experts

    cfg = v3_config()
    g = torch.Generator().manual_seed(0)
    ex = Experts(cfg)
    for p in ex.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    E, d, inter, r = 16, cfg.hidden_size, cfg.moe_intermediate_size, 8
    updates = tuple(LowRank(torch.randn(E, r, i, generator=g) * 0.1, torch.randn(E, o, r, generator=g) * 0.1, 0.5)
                    for o, i in ((inter, d), (inter, d), (d, inter)))
    x = torch.randn(n_tokens, d, generator=g)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, 4, generator=g)
    ref = naive_lora_experts(ex, updates, x, indices, weights)
    ex = ex.cuda().bfloat16()
    on_gpu = tuple(LowRank(u.a.cuda().bfloat16(), u.b.cuda().bfloat16(), u.scale) for u in updates)
    with torch.no_grad():
        got = ex(x.cuda().bfloat16(), indices.cuda(), weights.cuda(), sync_free=sync_free, updates=on_gpu)
    torch.testing.assert_close(got.float().cpu(), ref, rtol=3e-2, atol=3e-2)


def test_grpo_rollout_engine_follows_the_trained_weights_under_cuda_graphs(tmp_path):
    """GRPO on CUDA: the bf16 rollout copy replays CUDA graphs captured before training; after optimizer steps
    and in-place syncs, its greedy tokens equal those of a fresh engine on the written model (bf16, graphs)."""
    from deepmoe.engine.llm import LLM
    from deepmoe.posttrain.config import GRPOConfig, resolve
    from deepmoe.posttrain.grpo import GRPOTrainer

    from .posttrain_fixtures import TASK, micro_model_dir

    base = micro_model_dir(tmp_path / "base")
    cfg = resolve(GRPOConfig(model=str(base), task=TASK, task_examples=32, out=str(tmp_path / "run"), batch_size=2,
                             num_generations=4, steps=3, max_new_tokens=12, eval_problems=0, progress=False,
                             plots=False, lr=1e-2, device="cuda"), True)
    trainer = GRPOTrainer(cfg)
    prompt = trainer.data.train.ids[0]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    trainer.rollout.generate([prompt], 1, greedy, [0])  # captures the decode graphs on the starting weights
    for _ in range(3):
        trainer.train_step()
    after = trainer.rollout.generate([prompt], 1, greedy, [0])[0][0].token_ids
    final = trainer.write_final()
    fresh = LLM(final, device="cuda", dtype=torch.bfloat16).generate([prompt], greedy)[0].token_ids
    assert after == fresh
    engine = dict(trainer.rollout.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        assert torch.equal(engine[name], p.to(engine[name].dtype)), name
