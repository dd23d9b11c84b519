"""The static decode step: compiled whole (fullgraph, no recompiles inside a bucket) it gives exactly the
general engine's tokens; this is the CPU proof that the step is capturable in a CUDA graph."""

import pytest
import torch

from deepmoe.engine.decode_step import StaticDecoder, buckets_up_to
from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.model import build_model
from deepmoe.tokenizer import train_bpe

from .conftest import naive_greedy, v3_config

PROMPTS = [list(range(5, 30)), [7, 8, 9], list(range(100, 117)), [3]]


@pytest.fixture(scope="module")
def parts():
    cfg = v3_config(num_nextn_predict_layers=0, rope_scaling=None)
    model = build_model(cfg, seed=1)
    with torch.no_grad():  # a stronger head spreads the logits: no near-ties for argmax
        model.lm_head.weight.mul_(20)
    return model.eval(), train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(40)], 300)


def _generate(engine: LLMEngine, prompts, lengths: list[int]) -> list[list[int]]:
    seqs = [engine.add(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), str(i))
            for i, (p, n) in enumerate(zip(prompts, lengths))]
    while engine.scheduler.has_unfinished():
        engine.step()
    return [s.completion_token_ids for s in seqs]


def test_buckets():
    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_up_to(5) == [1, 2, 4, 5]


def test_compiled_decode_step_has_no_graph_breaks_and_equals_the_engine(parts):
    model, tok = parts
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    # ≥ 50 decode steps; with 4-token blocks every sequence crosses many block boundaries; as sequences
    # finish the batch shrinks from 4 rows through 3 (bucket 4) and 2 to 1
    n_new = [56, 40, 24, 8]
    engine = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=4)
    ref = _generate(engine, PROMPTS, n_new)
    fast = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=4)
    fast.runner.decoder = StaticDecoder(model, fast.runner.cache, 4, max_blocks=32, mode="compiled",
                                        compile_backend="eager")
    calls = []
    run = fast.runner.decoder.run
    fast.runner.decoder.run = lambda *a: calls.append(len(a[0])) or run(*a)
    got = _generate(fast, PROMPTS, n_new)
    assert got == ref
    assert ref[1] == naive_greedy(model, PROMPTS[1], n_new[1])
    assert len(calls) >= 50 and {1, 2, 3, 4} <= set(calls)  # the step ran in buckets 2 and 4 (3 rows → 4) and 1
    assert sum(counters["graph_break"].values()) == 0  # fullgraph=True would raise anyway: belt and braces
    # one graph per bucket used (1, 2, 4): nothing inside a bucket recompiles, however the data changes
    assert counters["stats"]["unique_graphs"] == 3


def test_static_step_pads_without_touching_other_sequences(parts):
    """A padding row writes only the scratch slot: a bucket of 4 for 3 rows leaves the cache as 3 rows do."""
    model, tok = parts
    results = []
    for max_num_seqs in (3, 4):
        engine = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=max_num_seqs,
                           decode_mode="static")
        results.append(_generate(engine, PROMPTS[:3], [12, 12, 12]))
    assert results[0] == results[1]


@pytest.fixture(scope="module")
def mtp_parts():
    cfg = v3_config(num_nextn_predict_layers=1, rope_scaling=None)
    model = build_model(cfg, seed=1)
    with torch.no_grad():  # spread the main and the MTP logits alike: no near-ties between the two paths
        model.lm_head.weight.mul_(20)
    return model.eval(), train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(40)], 300)


def _recording_propose(monkeypatch, truth: dict | None = None):
    """Record every draft the engine proposes from the MTP logits; with `truth` (prompt → greedy tokens),
    draft the true next token except at every third position instead (accepted and rejected drafts
    alternate, so the verify step sees rows of one and two kept tokens)."""
    import deepmoe.engine.llm as llm_module

    proposed = []
    real = llm_module.propose

    def propose(logits, p, history, prompt_len, generator):
        token = real(logits, p, history, prompt_len, generator)
        proposed.append((len(history), token))
        if truth is not None:
            prompt = tuple(history[:prompt_len])
            right = (list(prompt) + truth[prompt])[len(history)]
            token = right if len(history) % 3 else (right + 1) % 300
        return token

    monkeypatch.setattr(llm_module, "propose", propose)
    return proposed


@pytest.mark.parametrize("oracle", [False, True])
def test_compiled_speculative_steps_equal_the_general_engine(mtp_parts, monkeypatch, oracle):
    """Verification (T = 2 queries per row) and MTP drafting as static compiled steps: no graph breaks, one
    graph per (step, bucket, width) used, and the same tokens, the same MTP proposals (so the drafting step
    read the right hidden states and positions) and the same acceptance as the general path."""
    model, tok = mtp_parts
    prompts = PROMPTS[:3]
    n_new = [30, 22, 14]
    truth = {tuple(p): naive_greedy(model, p, n + 2) for p, n in zip(prompts, n_new)} if oracle else None
    results = []
    for mode in (None, "compiled"):
        proposed = _recording_propose(monkeypatch, truth)
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        engine = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=4, speculative=True)
        if mode:
            engine.runner.decoder = StaticDecoder(model, engine.runner.cache, 4, max_blocks=32, mode=mode,
                                                  compile_backend="eager", draft_tokens=1)
            widths = []
            run, draft = engine.runner.decoder.run, engine.runner.decoder.draft
            engine.runner.decoder.run = lambda t, *a: widths.append(max(map(len, t))) or run(t, *a)
            engine.runner.decoder.draft = lambda t, *a: widths.append(-max(map(len, t))) or draft(t, *a)
        tokens = _generate(engine, prompts, n_new)
        results.append((tokens, proposed, engine.num_drafted, engine.num_accepted))
        monkeypatch.undo()
    (ref, ref_proposed, drafted, accepted), (got, got_proposed, *stats) = results
    assert got == ref and got_proposed == ref_proposed and stats == [drafted, accepted]
    assert ref[0] == naive_greedy(model, prompts[0], n_new[0])
    assert drafted > 20 and (0 < accepted < drafted if oracle else accepted >= 0)
    # verify steps of width 2 and drafting steps that kept 2 tokens (an accepted draft) both ran statically
    assert widths.count(2) > 10 and (widths.count(-2) > 3 if oracle else True)
    assert sum(counters["graph_break"].values()) == 0
    # at most (main, draft) × buckets (1, 2, 4) × widths (1, 2) graphs, whatever the data
    assert counters["stats"]["unique_graphs"] <= 12
