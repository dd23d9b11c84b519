"""The engine end to end on a tiny random model: greedy output equals a naive full-recompute greedy loop
under chunked prefill, prefix caching, batching and preemption; seeded sampling does not depend on what
else is in the batch; stop strings, logprobs, n, the sampler's filters, and no leaked blocks."""

import pytest
import torch

import deepmoe.engine.llm as llm_module
from deepmoe.checkpoint import save_pretrained
from deepmoe.engine.detokenizer import IncrementalDetokenizer, decode_stable
from deepmoe.engine.kv_cache import budget_bytes, bytes_per_block
from deepmoe.engine.llm import LLM, LLMEngine
from deepmoe.engine.model_runner import cpu_decode_layout
from deepmoe.engine.sampler import apply_penalties, filter_logits, sample
from deepmoe.engine.sequence import SamplingParams
from deepmoe.model import build_model
from deepmoe.tokenizer import train_bpe

from .conftest import failing_sample, naive_greedy, v3_config

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 5}\n" for i in range(60)]


@pytest.fixture(scope="module")
def parts():
    cfg = v3_config(num_nextn_predict_layers=0, rope_scaling=None)
    torch.manual_seed(0)
    model = build_model(cfg, seed=1)
    with torch.no_grad():  # a stronger head than init's 0.02 spreads the logits: no near-ties for argmax
        model.lm_head.weight.mul_(20)
    return model.eval(), train_bpe(TEXTS, 300)


PROMPTS = [list(range(5, 30)), list(range(5, 30)) + [40, 41], [7, 8, 9], list(range(100, 160)), [3]]


@pytest.mark.parametrize("blocks,budget", [(1 << 20, 2048), (1 << 20, 8), (None, 16)])
def test_greedy_equals_naive_recompute(parts, blocks, budget):
    model, tok = parts
    cfg = model.config
    per_block = 4 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    # None: a cache of 26 blocks (104 tokens) for ~160 tokens of work: forces preemption and recompute
    engine = LLMEngine(model, tok, kv_cache_bytes=blocks or 26 * per_block, block_size=4, max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seqs = [engine.add(p, params, str(i)) for i, p in enumerate(PROMPTS)]
    while engine.scheduler.has_unfinished():
        engine.step()
    for p, s in zip(PROMPTS, seqs):
        assert s.completion_token_ids == naive_greedy(model, p, 12), p[:5]
        assert s.finish_reason == "length"
    assert engine.blocks.num_free_blocks == len(engine.blocks.blocks)  # nothing leaked
    assert (engine.scheduler.num_preemptions > 0) == (blocks is None)


def test_a_later_request_reuses_an_earlier_ones_prefix(parts):
    """The second prompt extends the first, which has finished: the first 24 of its 27 tokens are prefix-cache
    hits (6 full blocks, freed but intact), so its prefill computes only the last 3, and the output is exact."""
    model, tok = parts
    engine = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4)
    rows, run = [], engine.runner.run

    def spy(plan):  # what each step computes: (sequence, first position, tokens)
        rows.extend((item.seq.seq_id, item.seq.num_cached_tokens, item.num_tokens) for item in plan)
        return run(plan)

    engine.runner.run = spy
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    seqs = []
    for i, p in enumerate(PROMPTS[:2]):  # one after the other: requests admitted together cannot share
        seqs.append(engine.add(p, params, str(i)))
        while engine.scheduler.has_unfinished():
            engine.step()
    first, second = seqs
    assert [r for r in rows if r[0] == first.seq_id][0] == (first.seq_id, 0, 25)
    assert [r for r in rows if r[0] == second.seq_id][0] == (second.seq_id, 24, 3)
    assert second.completion_token_ids == naive_greedy(model, PROMPTS[1], 6)
    assert engine.blocks.num_free_blocks == len(engine.blocks.blocks)


def test_llm_api_from_a_model_directory(parts, tmp_path, monkeypatch):
    model, tok = parts
    save_pretrained(model, tmp_path)
    tok.save(tmp_path)
    llm = LLM(tmp_path, device="cpu", dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4)
    out = llm.generate(["def f1(x):", [5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.request_id for o in out] == ["0", "1"]
    assert out[1].token_ids == naive_greedy(model, [5, 6, 7], 6)
    assert out[0].text == tok.decode(out[0].token_ids, skip_special_tokens=True)

    sampled = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=3, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], sampled)[0].token_ids
    crowd = llm.generate([[9, 9], [5, 6, 7], list(range(20, 40))], sampled)[1].token_ids
    assert alone == crowd  # a seeded request is reproducible whatever it is batched with

    many = llm.generate([5, 6, 7], SamplingParams(temperature=1.0, n=3, max_tokens=5, seed=0, logprobs=2,
                                                  ignore_eos=True))[0]
    assert [o.index for o in many.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in many.outputs}) > 1  # n samples differ
    for o in many.outputs:
        assert len(o.logprobs) == 5
        assert all(o.token_ids[i] in lp and all(v <= 0 for v in lp.values()) for i, lp in enumerate(o.logprobs))

    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate("def f2(x):", free)[0]
    assert len(full.text) >= 5  # 40 tokens of a 300-token byte-level BPE: text to take a stop string from
    stop = full.text[3:5]  # surely in the output, so the request must stop on it
    cut = llm.generate("def f2(x):", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert len(cut.token_ids) < len(full.token_ids)
    assert llm.engine.blocks.num_free_blocks == len(llm.engine.blocks.blocks)
    with pytest.raises(ValueError, match="context"):
        llm.generate([[1] * model.config.max_position_embeddings])

    monkeypatch.setattr(llm_module, "sample", failing_sample(llm_module.sample, seed=666))
    with pytest.raises(RuntimeError, match=r"prompt 1 .*injected sampling failure"):  # named, not a bad output
        llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0.9, seed=666, max_tokens=4))
    assert llm.engine.blocks.num_free_blocks == len(llm.engine.blocks.blocks)


def test_stream_yields_the_text_of_generate_piece_by_piece(parts, tmp_path):
    model, tok = parts
    save_pretrained(model, tmp_path)
    tok.save(tmp_path)
    llm = LLM(tmp_path, device="cpu", dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate("def f2(x):", greedy)[0].text
    stop = full[6:8]  # a stop string the text surely reaches: held back while it may still complete
    for params in (greedy, SamplingParams(temperature=0.9, top_p=0.9, max_tokens=30, seed=5, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])):
        pieces = list(llm.stream("def f2(x):", params))
        assert len(pieces) > 2  # the text arrives as it is made, not at the end
        assert "".join(pieces) == llm.generate("def f2(x):", params)[0].text
    assert "".join(pieces) == full[:full.find(stop)]
    # a consumer that stops early (break, Ctrl-C) cancels the request: nothing keeps running or holds blocks
    pieces = llm.stream("def f2(x):", greedy)
    next(pieces)
    pieces.close()
    assert not llm.engine.scheduler.has_unfinished()
    assert llm.engine.blocks.num_free_blocks == len(llm.engine.blocks.blocks)
    with pytest.raises(ValueError, match="n must be 1"):
        next(llm.stream("def f2(x):", SamplingParams(n=2)))


def test_generate_finishes_requests_that_outgrow_the_cache(parts, tmp_path):
    """A 3-block cache holds 12 tokens. Each request stops with "length" at 13 tokens (the 13th is sampled
    from 12 cached ones) instead of preempting itself and waiting forever; the second, preempted while the
    first grows, is re-admitted once the first is done."""
    model, tok = parts
    save_pretrained(model, tmp_path)
    tok.save(tmp_path)
    llm = LLM(tmp_path, device="cpu", dtype=torch.float32, block_size=4,
              kv_cache_bytes=3 * bytes_per_block(model.config, 4, torch.float32))
    step, steps = llm.engine.step, []

    def guarded():  # a step limit, so a livelock fails the test instead of hanging it
        steps.append(1)
        assert len(steps) < 100, "generate is not making progress"
        return step()

    llm.engine.step = guarded
    prompts = [list(range(5, 10)), [7, 8, 9]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.finish_reason == "length" and o.token_ids == naive_greedy(model, p, 13 - len(p))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.num_free_blocks == 3


def test_a_sequence_that_fails_ends_alone_and_the_others_go_on(parts, monkeypatch):
    """A failure that belongs to one sequence (drawing its token, detokenising it for its stop strings) finishes
    that sequence with "error" and the reason; every other sequence in the same steps gets exactly the tokens
    it gets without it, and no block leaks."""
    model, tok = parts
    engine = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4)
    real_text = engine.text

    def text(seq):
        if seq.params.seed == 667 and seq.num_completion_tokens >= 3:  # fails mid-way, after 3 tokens
            raise RuntimeError("injected detokenizer failure")
        return real_text(seq)

    monkeypatch.setattr(llm_module, "sample", failing_sample(llm_module.sample, seed=666))
    monkeypatch.setattr(engine, "text", text)
    good = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
            SamplingParams(temperature=0.9, seed=5, max_tokens=10, ignore_eos=True)]
    bad = [SamplingParams(temperature=0.9, seed=666, max_tokens=10, ignore_eos=True),
           SamplingParams(temperature=0.9, seed=667, max_tokens=10, ignore_eos=True, stop=["\x00never"])]
    seqs = [engine.add(p, params, str(i)) for i, (p, params) in enumerate(zip(PROMPTS, good + bad))]
    while engine.scheduler.has_unfinished():
        engine.step()
    assert [s.finish_reason for s in seqs] == ["length", "length", "error", "error"]
    assert seqs[2].num_completion_tokens == 0 and "injected sampling failure" in seqs[2].error
    assert seqs[3].num_completion_tokens == 3 and "injected detokenizer failure" in seqs[3].error
    assert engine.blocks.num_free_blocks == len(engine.blocks.blocks)

    alone = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4)
    solo = [alone.add(p, params, str(i)) for i, (p, params) in enumerate(zip(PROMPTS, good))]
    while alone.scheduler.has_unfinished():
        alone.step()
    assert [s.completion_token_ids for s in seqs[:2]] == [s.completion_token_ids for s in solo]


def test_seeded_sampling_does_not_depend_on_memory_pressure(parts):
    """Seeded requests draw the same tokens, with the same logprobs, whether a tight cache preempts and
    recomputes them or not; a preempted sequence keeps the token it sampled in that step, so there is one
    logprob entry per token."""
    model, tok = parts
    params = SamplingParams(temperature=0.9, top_k=40, max_tokens=12, seed=11, logprobs=1, ignore_eos=True)
    runs = []
    for blocks in (1 << 20, 20 * bytes_per_block(model.config, 4, torch.float32)):  # 80 of ~220 tokens
        engine = LLMEngine(model, tok, kv_cache_bytes=blocks, block_size=4, max_num_batched_tokens=16)
        seqs = [engine.add(p, params, str(i)) for i, p in enumerate(PROMPTS)]
        while engine.scheduler.has_unfinished():
            engine.step()
        outs = [engine.output(s, 0) for s in seqs]
        for o in outs:
            assert len(o.logprobs) == len(o.token_ids) == 12
            assert all(t in lp for t, lp in zip(o.token_ids, o.logprobs))
        runs.append((engine.scheduler.num_preemptions, outs))
    (calm_preemptions, calm), (tight_preemptions, tight) = runs
    assert calm_preemptions == 0 and tight_preemptions > 0
    for c, t in zip(calm, tight):
        assert t.token_ids == c.token_ids
        for a, b in zip(c.logprobs, t.logprobs):  # recomputed prefill vs decode: equal up to rounding
            assert a.keys() == b.keys() and list(b.values()) == pytest.approx(list(a.values()), abs=1e-4)


def test_filters_and_penalties():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    keep = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).nonzero().flatten().tolist()  # noqa: E731
    assert keep(top_k=2) == [0, 1]
    assert keep(top_p=0.7) == [0, 1]  # p(0) = 0.64 < 0.7, so token 1 is needed too
    assert keep(min_p=0.3) == [0, 1]  # p(1) / p(0) = e^-1 = 0.37 >= 0.3, p(2) / p(0) = 0.14 < 0.3
    assert keep() == [0, 1, 2, 3, 4]
    pen = apply_penalties(logits.clone(), [0, 4, 1, 1], 2, SamplingParams(repetition_penalty=2.0,
                                                                         presence_penalty=0.5, frequency_penalty=0.25))
    # repetition on seen tokens {0, 1, 4}; then output tokens [1, 1]: presence 0.5 + frequency 2 x 0.25
    assert pen.tolist() == pytest.approx([1.5, 1.0 - 1.0, 1.0, 0.0, -2.0])


def test_decode_stable_holds_back_a_split_character(parts):
    _, tok = parts
    ids = tok.encode("é")  # byte-level BPE: unlikely to be one token in a corpus of ASCII code
    if len(ids) > 1:
        assert decode_stable(tok, ids[:1]) == ""
    assert decode_stable(tok, ids) == "é"


def test_batched_sample_treats_each_row_by_its_own_parameters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]] * 3)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=2.0),
              SamplingParams(temperature=1.0, top_k=1)]
    tokens, logps = sample(logits, params, [[0, 1], [0, 1], [0, 1]], [1, 1, 1], [None, None, None])
    assert tokens == [1, 2, 1]  # plain argmax; token 1 penalised (3.0 → 1.5) so 2 wins; top-1 sampling
    assert logps.shape == (3, 4)
    torch.testing.assert_close(logps[0], logits[0].log_softmax(-1))
    assert logps[1, 1] < logps[1, 2]  # logprobs are after penalties
    assert logits[1, 1] == 3.0  # the caller's logits are untouched


def test_incremental_detokenizer_equals_full_decode(parts):
    _, tok = parts
    text = "def f(x):\n    return 'héllo wörld ✓ 日本'  # ok\n"
    ids = tok.encode(text)
    detok, seen = IncrementalDetokenizer(tok), []
    for n in range(1, len(ids) + 1):
        seen.append(detok.update(ids[:n]))
        assert "\ufffd" not in seen[-1] and text.startswith(seen[-1])  # never half a character
    assert seen[-1] == text
    assert any(len(b) == len(a) for a, b in zip(seen, seen[1:]))  # some tokens ended inside a character


def test_cache_budget_from_device_memory(parts):
    gib = 2**30
    # 80 GiB at 90%: 72 GiB, minus 30 GiB resident (weights, other processes) and a 2 GiB activation peak
    assert budget_bytes(80 * gib, 30 * gib, 2 * gib, 0.9) == 40 * gib
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        budget_bytes(80 * gib, 70 * gib, 3 * gib, 0.9)
    with pytest.raises(ValueError, match="memory_fraction"):
        budget_bytes(80 * gib, 0, 0, 1.5)
    model, tok = parts  # on CPU the default is a fixed 256 MiB
    engine = LLMEngine(model, tok, block_size=16)
    per_block = bytes_per_block(model.config, 16, torch.float32)
    assert len(engine.blocks.blocks) == 256 * 2**20 // per_block


def test_bad_prompts_are_refused_before_they_reach_a_batch(parts):
    model, tok = parts
    engine = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([5, model.config.vocab_size], SamplingParams(), "bad")
    with pytest.raises(ValueError, match="context"):
        engine.add([5] * model.config.max_position_embeddings, SamplingParams(), "long")
    assert not engine.scheduler.has_unfinished()


def test_cpu_decode_layout_keeps_values_and_outputs():
    cfg = v3_config(num_nextn_predict_layers=0, rope_scaling=None)
    model = build_model(cfg, seed=3).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(x)
        params = {n: p.clone() for n, p in model.named_parameters()}
        cpu_decode_layout(model)
        after = model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n  # same values and shapes, only the strides move
    q = model.model.layers[0].self_attn.q_a_proj.weight
    assert q.t().is_contiguous() and not q.is_contiguous()
    assert model.model.layers[1].mlp.experts.gate_proj[0].t().is_contiguous()
    assert model.model.layers[0].self_attn.kv_b_proj.weight.is_contiguous()  # viewed per head: left alone
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
