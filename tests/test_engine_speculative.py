"""MTP speculative decoding: greedy output is exactly the non-speculative output (real MTP drafts, and an
oracle that drafts right and wrong on purpose to drive every bookkeeping path: multi-token appends across
block boundaries, stops inside a kept run, preemption); sampled verification is the plain draw, so seeded
output does not depend on drafts or memory pressure, and keeps the target distribution."""

import pytest
import torch

import deepmoe.engine.llm as llm_module
from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.engine.sampler import draw, token_generator
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
        return right if len(history) % 3 else (right + 1) % 512

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


def test_seeded_sampling_with_drafts_does_not_depend_on_memory_pressure(parts, monkeypatch):
    """Seeded requests draw the same tokens with the same logprobs with drafts or without, and under a cache
    so tight that sequences are preempted (losing their drafts) and recomputed. No token position is chosen
    twice (a sequence preempted after verifying keeps what it verified), so the acceptance counters count
    kept work only, and there is one logprob entry per token."""
    model, tok = parts
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=NEW, seed=5, logprobs=1, ignore_eos=True)
    real_sample, real_verify = llm_module.sample, llm_module.verify
    chosen, verified = [], [0, 0]  # (prompt, position) of each token chosen; drafts verified, accepted

    def sample(logits, ps, histories, prompt_lens, *rest):
        chosen.extend((tuple(h[:n]), len(h)) for h, n in zip(histories, prompt_lens))
        return real_sample(logits, ps, histories, prompt_lens, *rest)

    def verify(logits, p, history, prompt_len, drafts, *rest):
        tokens, logps = real_verify(logits, p, history, prompt_len, drafts, *rest)
        chosen.extend((tuple(history[:prompt_len]), len(history) + j) for j in range(len(tokens)))
        verified[0] += len(drafts)
        verified[1] += len(tokens) - 1
        return tokens, logps

    monkeypatch.setattr(llm_module, "sample", sample)
    monkeypatch.setattr(llm_module, "verify", verify)
    runs = []
    for speculative, blocks in [(False, 1 << 20), (True, 1 << 20), (True, 20 * per_block(model))]:
        chosen.clear()
        verified[:] = [0, 0]
        engine = LLMEngine(model, tok, kv_cache_bytes=blocks, block_size=4, max_num_batched_tokens=64,
                           speculative=speculative)
        seqs = [engine.add(p, params, str(i)) for i, p in enumerate(PROMPTS)]
        while engine.scheduler.has_unfinished():
            engine.step()
        outs = [engine.output(s, 0) for s in seqs]
        assert all(len(o.logprobs) == len(o.token_ids) == NEW for o in outs)
        assert len(set(chosen)) == len(chosen)  # nothing chosen was thrown away and chosen again
        assert [engine.num_drafted, engine.num_accepted] == verified
        assert (engine.num_drafted > 0) == speculative and (engine.scheduler.num_preemptions > 0) == (blocks < 1 << 20)
        runs.append(outs)
    plain = runs[0]
    for outs in runs[1:]:
        for a, b in zip(plain, outs):
            assert b.token_ids == a.token_ids
            for x, y in zip(a.logprobs, b.logprobs):  # batched verify vs decode: equal up to rounding
                assert x.keys() == y.keys() and list(y.values()) == pytest.approx(list(x.values()), abs=1e-4)


def test_no_mtp_layers_is_a_clear_error(parts):
    cfg = v3_config(num_nextn_predict_layers=0, rope_scaling=None)
    with pytest.raises(ValueError, match="MTP"):
        LLMEngine(build_model(cfg), parts[1], speculative=True)


def test_sampled_verification_is_the_plain_draw_and_keeps_the_target_distribution():
    """Draft d ~ q with its position's generator, verify against p: every emitted token is the one plain
    sampling draws with the same generators, whatever q is (so the first is distributed as p1); the coupled
    draft is kept at least (1 - tv) / (1 + tv) of the time (Gumbel-max coupling), far more than an
    independent draft's Σ p1·q, and always when q is p1."""
    g = torch.Generator().manual_seed(0)
    V, n = 6, 10_000
    p1, p2, q = (torch.rand(V, generator=g) ** 3 for _ in range(3))
    p1, p2, q = p1 / p1.sum(), p2 / p2.sum(), q / q.sum()
    logits = torch.stack([p1.log(), p2.log()])
    params = SamplingParams(temperature=1.0)
    first, kept, kept_when_equal = torch.zeros(V), 0, 0
    for seed in range(n):
        gens = lambda: [token_generator(seed, 0, "cpu"), token_generator(seed, 1, "cpu")]  # noqa: E731
        tokens, _ = verify(logits, params, [0], 1, [draw(q.log(), q, gens()[0])], gens())
        assert tokens[0] == draw(p1.log(), p1, gens()[0])
        if len(tokens) == 2:
            kept += 1
            assert tokens[1] == draw(p2.log(), p2, gens()[1])
        first[tokens[0]] += 1
        kept_when_equal += len(verify(logits, params, [0], 1, [draw(p1.log(), p1, gens()[0])], gens())[0]) == 2
    assert 0.5 * (first / n - p1).abs().sum().item() < 0.025
    tv = 0.5 * (p1 - q).abs().sum().item()
    assert kept / n > (1 - tv) / (1 + tv) - 0.015 and kept / n > (p1 * q).sum().item() + 0.1
    assert kept_when_equal == n


def test_greedy_verify_keeps_drafts_while_they_match():
    logits = torch.eye(5)[[3, 1, 4]] * 10  # target argmax: 3, then 1, then 4
    p = SamplingParams(temperature=0)
    assert verify(logits, p, [0], 1, [3, 1], [None] * 3)[0] == [3, 1, 4]  # both kept + bonus
    assert verify(logits, p, [0], 1, [3, 2], [None] * 3)[0] == [3, 1]  # second corrected
    assert verify(logits, p, [0], 1, [0, 1], [None] * 3)[0] == [3]  # first corrected
