"""MTP speculative decoding: greedy output is exactly the non-speculative output (real MTP drafts, and an
oracle that drafts right and wrong on purpose to drive every bookkeeping path: multi-token appends across
block boundaries, stops inside a kept run, preemption); rejection sampling keeps the target distribution."""

import pytest
import torch

import deepmoe.engine.llm as llm_module
from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.engine.speculative import verify
from deepmoe.model import build_model
from deepmoe.tokenizer import train_bpe

from .conftest import naive_greedy, v3_config

PROMPTS = [list(range(5, 30)), list(range(5, 30)) + [40, 41], [7, 8, 9], list(range(100, 160)), [3]]
NEW = 14


@pytest.fixture(scope="module")
def parts():
    cfg = v3_config(num_nextn_predict_layers=1, rope_scaling=None)
    model = build_model(cfg, seed=1)
    with torch.no_grad():  # spread the logits: no near-ties for argmax between batched and one-by-one runs
        model.lm_head.weight.mul_(20)
    return model.eval(), train_bpe(["def f(x):\n    return x\n"] * 20, 300)


@pytest.fixture(scope="module")
def truth(parts):
    model, _ = parts
    return {tuple(p): naive_greedy(model, p, NEW + 2) for p in PROMPTS}


def per_block(model):
    cfg = model.config
    return 4 * (cfg.num_hidden_layers + 1) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def run(engine, params, prompts=PROMPTS):
    seqs = [engine.add(p, params, str(i)) for i, p in enumerate(prompts)]
    while engine.scheduler.has_unfinished():
        engine.step()
    assert engine.blocks.num_free_blocks == len(engine.blocks.blocks)  # nothing leaked
    bs = engine.blocks.block_size
    for b in engine.blocks.blocks:  # a prefix-cache entry holds the full block it was hashed from
        assert b.hash is None or len(b.token_ids) == bs
    return seqs


@pytest.mark.parametrize("blocks,budget", [(1 << 20, 2048), (1 << 20, 8), (None, 16)])
def test_greedy_with_mtp_drafts_equals_plain_greedy(parts, truth, blocks, budget):
    model, tok = parts
    engine = LLMEngine(model, tok, kv_cache_bytes=blocks or 26 * per_block(model), block_size=4,
                       max_num_batched_tokens=budget, speculative=True)
    seqs = run(engine, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    for p, s in zip(PROMPTS, seqs):
        assert s.completion_token_ids == truth[tuple(p)][:NEW], p[:5]
    assert engine.num_drafted > 0
    if blocks is None:
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("blocks", [1 << 20, None])
def test_oracle_drafts_exercise_accept_and_reject(parts, truth, monkeypatch, blocks):
    """Draft the true next-next token, except a wrong one at every third position: runs of kept drafts
    (two tokens per step) and rejections alternate, and the output must still be exact."""
    model, tok = parts

    def oracle(logits, p, history, prompt_len, generator):
        prompt = next(q for q in PROMPTS if history[:len(q)] == q and len(q) == prompt_len)
        future = prompt + truth[tuple(prompt)]
        right = future[len(history)]
        return (right if len(history) % 3 else (right + 1) % 512), None

    monkeypatch.setattr(llm_module, "propose", oracle)
    engine = LLMEngine(model, tok, kv_cache_bytes=blocks or 26 * per_block(model), block_size=4,
                       max_num_batched_tokens=64, speculative=True)
    seqs = run(engine, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    for p, s in zip(PROMPTS, seqs):
        assert s.completion_token_ids == truth[tuple(p)][:NEW]  # max_tokens holds inside a kept run
    assert 0.3 < engine.acceptance_rate < 0.9 and engine.num_accepted < engine.num_drafted

    # a stop token inside a kept run (tried at several positions, so some land on a kept draft): the
    # sequence ends at the stop token and the bonus token after it is dropped
    want = truth[tuple(PROMPTS[0])]
    for at in range(2, 9):
        (s,) = run(engine, SamplingParams(temperature=0, max_tokens=NEW, stop_token_ids=[want[at]]), [PROMPTS[0]])
        assert s.completion_token_ids == want[:want.index(want[at]) + 1] and s.finish_reason == "stop"


def test_seeded_sampling_with_drafts_is_reproducible(parts):
    model, tok = parts
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=10, seed=5, ignore_eos=True)
    outs = []
    for prompts in ([PROMPTS[2]], [PROMPTS[0], PROMPTS[2], PROMPTS[3]]):
        engine = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4, speculative=True)
        outs.append(run(engine, params, prompts)[prompts.index(PROMPTS[2])].completion_token_ids)
        assert engine.num_drafted > 0
    assert outs[0] == outs[1]


def test_no_mtp_layers_is_a_clear_error(parts):
    cfg = v3_config(num_nextn_predict_layers=0, rope_scaling=None)
    with pytest.raises(ValueError, match="MTP"):
        LLMEngine(build_model(cfg), parts[1], speculative=True)


def test_rejection_sampling_keeps_the_target_distribution():
    """Draft d ~ q, verify against p: the first emitted token is distributed as p1, and after a kept draft
    the bonus token as p2 — whatever q is."""
    g = torch.Generator().manual_seed(0)
    V, n = 6, 40_000
    p1, p2, q = (torch.rand(V, generator=g) ** 3 for _ in range(3))
    p1, p2, q = p1 / p1.sum(), p2 / p2.sum(), q / q.sum()
    logits = torch.stack([p1.log(), p2.log()])
    params = SamplingParams(temperature=1.0)
    first = torch.zeros(V)
    second = torch.zeros(V)
    kept = 0
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    for d in drafts:
        tokens, _ = verify(logits, params, [0], 1, [d], [q], g)
        first[tokens[0]] += 1
        if len(tokens) == 2:
            kept += 1
            second[tokens[1]] += 1
    tv = lambda counts, p: 0.5 * (counts / counts.sum() - p).abs().sum().item()  # noqa: E731
    assert tv(first, p1) < 0.015
    assert tv(second, p2) < 0.03
    expected_kept = torch.minimum(p1, q).sum().item()  # the acceptance probability Σ min(p, q)
    assert abs(kept / n - expected_kept) < 0.015


def test_greedy_verify_keeps_drafts_while_they_match():
    logits = torch.eye(5)[[3, 1, 4]] * 10  # target argmax: 3, then 1, then 4
    p = SamplingParams(temperature=0)
    assert verify(logits, p, [0], 1, [3, 1], [None, None], None)[0] == [3, 1, 4]  # both kept + bonus
    assert verify(logits, p, [0], 1, [3, 2], [None, None], None)[0] == [3, 1]  # second corrected
    assert verify(logits, p, [0], 1, [0, 1], [None, None], None)[0] == [3]  # first corrected
