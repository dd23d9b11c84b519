"""Paged MLA decode: the torch reference against a plain per-row loop, the Triton kernel against the
reference (on the CPU under Triton's interpreter, on CUDA natively), and the static-shape guarantees.

Triton decides interpreter or compiler when a @triton.jit function is defined, i.e. when
deepmoe.kernels is first imported, reading TRITON_INTERPRET then. Any earlier import in the pytest
process (another test, a plugin) would fix the choice, so the interpreter cases run in one child
process started with TRITON_INTERPRET=1: this file is also its script (`__main__` at the bottom).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepmoe.kernels import default_num_splits, paged_mla_decode, paged_mla_decode_reference
from deepmoe.kernels.paged_mla_decode import MAX_SPLITS

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(B, H, R, P, block_size, lens, dtype=torch.float32, seed=0, device="cpu", width=None, pool=None):
    """Random queries and a cache whose blocks are a random permutation of the pool (rows interleaved,
    never contiguous); table entries past a row's blocks are -1 so that reading one would show.
    width (table columns) and pool (cache blocks) default to what the lengths need, plus 3 spare blocks."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in lens]
    width = width or max(1, max(need))
    pool = pool or sum(need) + 3
    ids = torch.randperm(pool, generator=g).tolist()
    table = torch.full((B, width), -1, dtype=torch.int32)
    for b, k in enumerate(need):
        table[b, :k] = torch.tensor(ids[:k], dtype=torch.int32)
        ids = ids[k:]
    c_kv = torch.randn(pool * block_size, R, generator=g)
    k_pe = torch.randn(pool * block_size, P, generator=g)
    q_lat = torch.randn(B, H, R, generator=g)
    q_pe = torch.randn(B, H, P, generator=g)
    scale = 1.5 / math.sqrt(R + P)  # logits of std ~1.5: the softmax neither flat nor one-hot
    to = dict(dtype=dtype, device=device)
    return (q_lat.to(**to), q_pe.to(**to), c_kv.to(**to), k_pe.to(**to), table.to(device),
            torch.tensor(lens, device=device), block_size, scale)


def brute_force(q_lat, q_pe, c_kv, k_pe, table, lens, block_size, scale):
    """Dense attention over each row's positions, gathered one by one, in float64."""
    B, H, R = q_lat.shape
    out = torch.zeros(B, H, R, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        slots = [int(table[b, p // block_size]) * block_size + p % block_size for p in range(n)]
        keys = torch.cat([c_kv[slots], k_pe[slots]], dim=-1).double()  # (n, R + P)
        q = torch.cat([q_lat[b], q_pe[b]], dim=-1).double()  # (H, R + P)
        out[b] = torch.softmax(q @ keys.T * scale, dim=-1) @ c_kv[slots].double()
    return out


# ---- the reference (no Triton needed) ----

@pytest.mark.parametrize("lens,block_size", [([1], 4), ([5, 1, 12, 0, 9], 4), ([37, 64, 3], 16)])
def test_reference_matches_per_row_loop(lens, block_size):
    args = make_inputs(len(lens), 3, 32, 8, block_size, lens)
    got = paged_mla_decode_reference(*args)
    assert got.shape == (len(lens), 3, 32)
    torch.testing.assert_close(got.double(), brute_force(*args), atol=1e-5, rtol=1e-5)
    assert (got[torch.tensor(lens) == 0] == 0).all()  # an empty row (a graph's padding) gives zeros


def test_reference_is_static_shape():
    """Different context lengths and tables at fixed shapes: one graph, no breaks, no recompiles (no host
    sync, no data-dependent shape), so the same call can sit inside a CUDA graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(paged_mla_decode_reference, fullgraph=True, dynamic=False, backend="eager")
    for seed, lens in enumerate([[3, 9, 1], [12, 2, 7], [0, 16, 5]]):
        args = make_inputs(3, 4, 32, 8, 4, lens, seed=seed, width=4, pool=9)
        torch.testing.assert_close(step(*args), paged_mla_decode_reference(*args))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_default_num_splits_from_shapes():
    v3 = dict(rank=512, rope=64, itemsize=2)
    assert default_num_splits(1, 16, 64, **v3) == 1  # short context: a split's partial would cost too much
    assert default_num_splits(1, 16, 8192, **v3) == MAX_SPLITS  # one row, long context: fill the chip
    assert default_num_splits(256, 16, 8192, **v3) == 2  # enough rows already
    assert default_num_splits(1, 128, 8192, **v3) < default_num_splits(1, 16, 8192, **v3)  # bigger partials


def test_wrapper_falls_back_and_checks_shapes():
    args = make_inputs(2, 4, 32, 8, 4, [3, 6])
    torch.testing.assert_close(paged_mla_decode(*args), paged_mla_decode_reference(*args))  # CPU: reference
    q_lat, q_pe, *rest = args
    with pytest.raises(ValueError, match="shapes disagree"):
        paged_mla_decode(q_lat, q_pe[..., :4], *rest)
    with pytest.raises(ValueError, match="context_lens"):
        paged_mla_decode(q_lat, q_pe, *rest[:3], rest[3][:1], *rest[4:])


# ---- the Triton kernel under the interpreter, in a child process ----

# (name, B, H, R, P, block_size, lens, num_splits, dtype); H < 16 takes the tl.sum path, H ≥ 16 tl.dot
CASES = [
    ("one-token-batch-1-head-1", 1, 1, 32, 8, 4, [1], 1, "float32"),
    ("ragged-mid-block-h4", 5, 4, 64, 16, 8, [1, 8, 13, 30, 41], 3, "float32"),
    ("more-splits-than-blocks-h5", 3, 5, 32, 8, 4, [3, 6, 9], 8, "float32"),
    ("empty-rows-h4", 3, 4, 32, 8, 4, [0, 5, 0], 2, "float32"),
    ("dot-h16", 4, 16, 64, 16, 16, [1, 17, 40, 64], 2, "float32"),
    ("dot-h20-partial-head-block", 3, 20, 32, 8, 8, [5, 33, 50], 4, "float32"),
    ("dot-v3-widths-r512-p64", 2, 16, 512, 64, 16, [20, 45], 2, "float32"),
    ("multi-tile-splits-h4", 2, 4, 32, 8, 4, [97, 150], 2, "float32"),  # tiles of 32: 2-3 per split
    ("dot-multi-tile-block-64-h16", 2, 16, 32, 8, 64, [100, 130], 1, "float32"),
    ("batch-33-default-splits", 33, 4, 32, 8, 4, [1 + (7 * b) % 29 for b in range(33)], None, "float32"),
    ("bf16-h4", 4, 4, 64, 16, 8, [1, 9, 22, 31], 3, "bfloat16"),
    ("bf16-h5-one-split", 3, 5, 32, 8, 4, [2, 11, 17], 1, "bfloat16"),
]
TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def run_case(name, B, H, R, P, block_size, lens, num_splits, dtype, device="cpu") -> dict:
    dt = getattr(torch, dtype)
    args = make_inputs(B, H, R, P, block_size, lens, dtype=dt, seed=len(name), device=device)
    got = paged_mla_decode(*args, num_splits=num_splits, use_triton=True)
    want = paged_mla_decode_reference(*args)
    return {"dtype": str(got.dtype).removeprefix("torch."), "finite": bool(got.isfinite().all()),
            "err": (got.float() - want.float()).abs().max().item()}


@pytest.fixture(scope="module")
def interpreted():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_interpreted(interpreted, case):
    res = interpreted[case[0]]
    assert "error" not in res, res.get("error")
    assert res["dtype"] == case[-1] and res["finite"]
    assert res["err"] < TOL[case[-1]], f"{case[0]}: max |kernel - reference| = {res['err']:.2e}"


@needs_triton
def test_kernel_on_cpu_needs_the_interpreter():
    mod = importlib.import_module("deepmoe.kernels.paged_mla_decode")  # the attribute is the function
    if type(mod._stage1).__name__ == "InterpretedFunction":
        pytest.skip("this process imported the kernels under TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        paged_mla_decode(*make_inputs(1, 4, 32, 8, 4, [3]), use_triton=True)


# ---- CUDA: bf16 tl.dot (the interpreter multiplies bf16 bit patterns in tl.dot), no syncs, graph capture ----

@pytest.mark.cuda
@cuda
@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("H", [1, 5, 16, 20, 128])
def test_kernel_matches_reference_cuda(H, dtype):
    lens = [1, 63, 64, 65, 1000, 4097, 0, 2500]
    args = make_inputs(len(lens), H, 512, 64, 64, lens, dtype=getattr(torch, dtype), device="cuda")
    want = paged_mla_decode_reference(*args)
    for splits in (1, 7, None):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the call raises
        try:
            got = paged_mla_decode(*args, num_splits=splits)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=0)


@pytest.mark.cuda
@cuda
@needs_triton
def test_kernel_replays_in_a_cuda_graph():
    """Captured once, replayed with other lengths and tables written into the same tensors."""
    lens = [5, 300, 77, 1024]
    q_lat, q_pe, c_kv, k_pe, table, ctx, bs, scale = make_inputs(4, 16, 512, 64, 64, lens, dtype=torch.bfloat16,
                                                                 device="cuda", pool=80)
    run = lambda: paged_mla_decode(q_lat, q_pe, c_kv, k_pe, table, ctx, bs, scale, num_splits=8)  # noqa: E731
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        run()  # compile and warm up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ctx.copy_(torch.randint(0, 1025, (4,), generator=g))
        table.copy_(torch.randperm(c_kv.shape[0] // bs, generator=g)[: table.numel()].view_as(table))
        q_lat.copy_(torch.randn(q_lat.shape, generator=g))
        graph.replay()
        want = paged_mla_decode_reference(q_lat, q_pe, c_kv, k_pe, table, ctx, bs, scale)
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=0)


if __name__ == "__main__":  # the interpreter child: every case, one JSON line of results
    torch.set_num_threads(2)
    results = {}
    for case in CASES:
        try:
            results[case[0]] = run_case(*case)
        except Exception as e:  # report per case, so one failure does not hide the others
            results[case[0]] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))
