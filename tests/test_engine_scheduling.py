"""Engine bookkeeping without a model: sampling-parameter validation, the block manager (allocation, prefix
caching by chained hash, reference counts, no leaks) and the scheduler (chunked prefill, continuous
batching, FCFS admission, preemption, stop rules), driven by a fake model that returns fixed tokens."""

import pytest

from deepmoe.engine.block_manager import BlockManager
from deepmoe.engine.scheduler import Scheduler
from deepmoe.engine.sequence import SamplingParams, Sequence, Status

BS = 4


def seq(tokens, **params):
    return Sequence(list(tokens), SamplingParams(**params))


def computed(bm, s):
    """What the runner + scheduler do after a full prefill: every token's latents are in the cache."""
    s.num_cached_tokens = len(s)
    bm.commit(s)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=2), dict(max_tokens=0), dict(n=0), dict(logprobs=50),
                                 dict(repetition_penalty=0), dict(presence_penalty=3)])
def test_sampling_params_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_sampling_params_defaults():
    p = SamplingParams(temperature=0, stop="\n\n")
    assert p.greedy and p.stop == ["\n\n"]
    with pytest.raises(ValueError, match="empty"):
        Sequence([], p)


def test_allocate_append_deallocate_leaks_nothing():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(range(10))
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5 and a.num_cached_tokens == 0
    computed(bm, a)
    for t in (100, 101, 102):  # 10 → 13 tokens: the 13th needs a fourth block
        a.append(t)
        assert bm.can_append(a)
        bm.append(a)
    assert len(a.block_table) == 4 and bm.blocks[a.block_table[2]].token_ids == [8, 9, 100, 101]
    bm.deallocate(a)
    assert bm.num_free_blocks == 8 and a.block_table == [] and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_cache_shares_computed_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = seq(range(10))
    bm.allocate(a)
    b = seq([*range(8), 50, 51])
    bm.allocate(b)
    assert b.num_cached_tokens == 0  # a's blocks are allocated but not computed yet: no hit
    bm.deallocate(b)
    computed(bm, a)
    c = seq([*range(8), 50, 51])
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert c.block_table[2] != a.block_table[2]  # the partial third block is private
    # a prompt that is entirely cached still computes its last block, for the next token's logits
    d = seq(range(8))
    bm.allocate(d)
    assert d.num_cached_tokens == 4 and d.block_table[0] == a.block_table[0] and d.block_table[1] != a.block_table[1]
    # same tokens after a different prefix are a different block: the hash chains over the prefix
    e = seq([9, 9, 9, 9, 4, 5, 6, 7, 1])
    bm.allocate(e)
    assert e.num_cached_tokens == 0
    for s in (a, c, d, e):
        bm.deallocate(s)
    assert bm.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    bm.deallocate(a)
    again = seq([*range(8), 77])
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.num_cached_tokens == 8  # hit on freed-but-intact blocks
    bm.deallocate(again)
    other = seq([5] * 12)  # takes every block, overwriting the cached contents
    bm.allocate(other)
    bm.deallocate(other)
    third = seq([*range(8), 77])
    bm.allocate(third)
    assert third.num_cached_tokens == 0 and bm.by_hash == {}


def run(scheduler, eos=None, token=lambda s: 7, max_steps=500):
    """Drive the scheduler with a fake model; returns the plans (seq_id, num_tokens) per step."""
    steps = []
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        assert plan, "scheduler made no progress"
        steps.append([(p.seq.seq_id, p.num_tokens) for p in plan])
        scheduler.postprocess(plan, {p.seq.seq_id: [token(p.seq)] for p in plan if p.samples}, eos)
        assert len(steps) < max_steps
    return steps


def test_chunked_prefill_then_decode():
    bm = BlockManager(num_blocks=16, block_size=BS)
    sch = Scheduler(bm, max_num_batched_tokens=5)
    s = seq(range(12), max_tokens=3)
    sch.add(s)
    steps = run(sch)
    assert steps == [[(s.seq_id, 5)], [(s.seq_id, 5)], [(s.seq_id, 2)], [(s.seq_id, 1)], [(s.seq_id, 1)]]
    assert s.completion_token_ids == [7, 7, 7] and s.finish_reason == "length" and s.is_finished
    assert bm.num_free_blocks == 16


def test_continuous_batching_decodes_first_and_admits_in_order():
    bm = BlockManager(num_blocks=32, block_size=BS)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8)
    a, b, c = seq(range(6), max_tokens=4), seq(range(6), max_tokens=2), seq(range(3), max_tokens=2)
    for s in (a, b, c):
        sch.add(s)
    steps = run(sch)
    # step 1: a's prompt (6) and 2 tokens of b's; step 2: a decodes first, then b's remaining 4
    assert steps[0] == [(a.seq_id, 6), (b.seq_id, 2)]
    assert steps[1] == [(a.seq_id, 1), (b.seq_id, 4)]
    assert all(len(step) <= 2 for step in steps)  # max_num_seqs
    first_c = next(i for i, step in enumerate(steps) if any(sid == c.seq_id for sid, _ in step))
    assert first_c > 1  # c waited for a slot
    assert [s.num_completion_tokens for s in (a, b, c)] == [4, 2, 2] and bm.num_free_blocks == 32


def test_preemption_recomputes_and_frees_everything():
    bm = BlockManager(num_blocks=5, block_size=BS)  # 20 token slots for two sequences growing to 15 each
    sch = Scheduler(bm, max_num_batched_tokens=64)
    a, b = seq(range(7), max_tokens=8), seq(range(100, 107), max_tokens=8)
    sch.add(a)
    sch.add(b)
    run(sch, token=lambda s: 1000 + s.num_completion_tokens)
    assert sch.num_preemptions >= 1
    for s in (a, b):
        assert s.finish_reason == "length" and s.completion_token_ids == list(range(1000, 1008))
    assert bm.num_free_blocks == 5 and all(block.ref_count == 0 for block in bm.blocks)


def test_stop_rules():
    bm = BlockManager(num_blocks=16, block_size=BS)
    sch = Scheduler(bm)
    eos_stop, tok_stop, ignore = seq([1, 2], max_tokens=10), seq([1, 2], max_tokens=10, stop_token_ids=[5]), \
        seq([1, 2], max_tokens=3, ignore_eos=True)
    for s in (eos_stop, tok_stop, ignore):
        sch.add(s)
    run(sch, eos=9, token=lambda s: 9 if s is not tok_stop else 5)
    assert (eos_stop.finish_reason, eos_stop.completion_token_ids) == ("stop", [9])
    assert (tok_stop.finish_reason, tok_stop.completion_token_ids) == ("stop", [5])
    assert (ignore.finish_reason, ignore.completion_token_ids) == ("length", [9, 9, 9])


def test_abort_and_oversized_prompt():
    bm = BlockManager(num_blocks=4, block_size=BS)
    sch = Scheduler(bm)
    with pytest.raises(ValueError, match="cannot fit"):
        sch.add(seq(range(16)))
    s = seq(range(6))
    sch.add(s)
    sch.schedule()
    sch.finish(s, "abort")
    assert s.status is Status.FINISHED and s.finish_reason == "abort" and not sch.has_unfinished()
    assert bm.num_free_blocks == 4


def test_prefill_rows_of_similar_length_share_a_forward():
    from deepmoe.engine.model_runner import batch_rows

    assert batch_rows([1, 1, 2, 1]) == [[0, 1, 2, 3]]  # decodes and drafts: one pass
    assert batch_rows([32] * 5 + [1]) == [[5], [0, 1, 2, 3, 4]]  # equal prompts: one pass, no padding
    groups = batch_rows([100, 10, 12, 90, 11, 1000, 2])
    assert groups == [[6], [1, 4, 2], [3, 0], [5]]  # sorted by length, padding ≤ 25% per pass
    for g in groups[1:]:
        lengths = [[100, 10, 12, 90, 11, 1000, 2][i] for i in g]
        assert len(g) * max(lengths) <= 1.25 * sum(lengths)


def test_a_sequence_outgrowing_the_whole_cache_finishes_with_length():
    """3 blocks hold 12 tokens: a 5-token prompt asking for 20 more stops at 13 tokens (the 13th is sampled
    from the 12 cached ones and needs no slot), instead of preempting itself and waiting forever."""
    bm = BlockManager(num_blocks=3, block_size=BS)
    sch = Scheduler(bm)
    s = seq(range(5), max_tokens=20)
    sch.add(s)
    run(sch, max_steps=50)
    assert (s.finish_reason, s.num_completion_tokens) == ("length", 8)
    assert bm.num_free_blocks == 3
    # were the scheduler ever stuck (here: blocks leaked outside it), it says so instead of looping
    t = seq(range(5))
    sch.add(t)
    bm.allocate(seq(range(9)))
    with pytest.raises(RuntimeError, match="no progress"):
        sch.schedule()


def test_outgrowing_the_cache_beside_others_preempts_them_and_everyone_finishes():
    """a (5 + 20 tokens) cannot fit 4 blocks; b and c can. a, admitted first, preempts the later arrivals to
    grow, stops at the cache's capacity, and then the preempted ones are re-admitted and finish."""
    bm = BlockManager(num_blocks=4, block_size=BS)
    sch = Scheduler(bm)
    a, b, c = seq(range(5), max_tokens=20), seq(range(50, 53), max_tokens=6), seq(range(60, 62), max_tokens=3)
    for s in (a, b, c):
        sch.add(s)
    run(sch, token=lambda s: 1000 + s.num_completion_tokens, max_steps=100)
    assert sch.num_preemptions >= 1
    assert (a.finish_reason, a.completion_token_ids) == ("length", list(range(1000, 1012)))
    assert (b.finish_reason, b.completion_token_ids) == ("length", list(range(1000, 1006)))
    assert (c.finish_reason, c.completion_token_ids) == ("length", list(range(1000, 1003)))
    assert bm.num_free_blocks == 4 and all(block.ref_count == 0 for block in bm.blocks)


def test_a_sequence_preempted_in_the_step_it_sampled_keeps_its_token():
    """Every sampled token ends up in its sequence: a sequence preempted after it sampled (because one ahead
    of it needed its block) keeps the token rather than sampling that position again after recompute, which
    would pair logprobs with the wrong tokens and advance its seeded generator twice."""
    bm = BlockManager(num_blocks=4, block_size=BS)  # a's 8 and b's 6 prompt tokens fill all four
    sch = Scheduler(bm)
    a, b = seq(range(8), max_tokens=4), seq(range(100, 106), max_tokens=4)
    sch.add(a)
    sch.add(b)
    draws = {a.seq_id: [], b.seq_id: []}
    counter = iter(range(10_000))

    def token(s):  # a fresh value per draw: a dropped and redrawn token shows up as a gap
        draws[s.seq_id].append(next(counter))
        return draws[s.seq_id][-1]

    steps = run(sch, token=token)
    # step 1 prefills both and samples for both; a's 9th token needs a fifth block, so b is preempted
    assert steps[0] == [(a.seq_id, 8), (b.seq_id, 6)] and sch.num_preemptions == 1
    for s in (a, b):
        assert s.completion_token_ids == draws[s.seq_id] and s.num_completion_tokens == 4
