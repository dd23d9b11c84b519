"""The quantised matmul kernel (deepmoe/kernels/quant_matmul.py) against its torch reference and against
the exact product, on the CPU under Triton's interpreter and on CUDA natively; and the quantised modules
(QuantLinear, QuantExperts' grouped and sync-free paths) on the kernel against the same modules on the
reference, including a CUDA graph replay.

Triton decides interpreter or compiler when a @triton.jit function is defined, i.e. when the kernel
module is first imported, reading TRITON_INTERPRET then; an earlier import in the pytest process would fix
the choice, so the interpreter cases run in one child process started with TRITON_INTERPRET=1 (this file
is also its script, `__main__` at the bottom), as tests/test_kernel_paged_mla.py does.

Tolerances, with S = |x| @ |W|ᵀ (the sum of absolute products, fp64) and u the unit roundoff of x's
dtype (2^-8 bf16, 2^-11 fp16):
  - fp32: |kernel − reference| and |kernel − exact| ≤ 2^-18 · S. Both sum the same fp32 products in
    another order (the kernel scales once per group), so they differ by a few ulps of S: ~√K · 2^-24 · S
    typically, 2^-18 = 64 ulps leaves room for K up to a few thousand.
  - bf16 / fp16 against the exact product: ≤ 2u·|exact| + 2^-20 · S. The kernel accumulates in fp32 and
    rounds once to x's dtype (on CUDA to nearest, ≤ u; the interpreter truncates, ≤ 2u).
  - bf16 / fp16 against the reference: ≤ 4u · S. The reference first rounds every dequantised weight to
    x's dtype (≤ u·S in the sum) and then its output (≤ u·|y|), on top of the kernel's 2u·|y|; |y| ≤ S.
Each case also checks that its bound is small against the output (under 10% of max |y|), so the
comparison could fail: a wrong scale, nibble or expert moves outputs by about their own size.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepmoe.quant.modules import QuantExperts, QuantLinear, set_weight, use_kernel, use_reference
from deepmoe.quant.scheme import QuantScheme, decode, encode

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

# (name, bits, M, N, K, g, dtype, num_splits, experts) — experts: gathered over that many stacked experts
CASES = [
    ("int8-gemv-fp32", 8, 1, 40, 256, 64, "float32", None, 0),
    ("int4-gemv-fp32", 4, 1, 40, 256, 64, "float32", None, 0),
    ("int8-rows3-split2-n33-g32", 8, 3, 33, 128, 32, "float32", 2, 0),
    ("int4-rows16-split2-bf16-g128", 4, 16, 70, 256, 128, "bfloat16", 2, 0),
    ("int4-rows5-bf16-g32", 4, 5, 24, 128, 32, "bfloat16", None, 0),
    ("int8-rows17-two-row-blocks", 8, 17, 20, 128, 128, "float32", 1, 0),
    ("int4-rows17-two-row-blocks-bf16", 4, 17, 20, 128, 64, "bfloat16", 1, 0),
    ("int8-one-group-k64-bf16", 8, 1, 48, 64, 64, "bfloat16", None, 0),
    ("int4-one-group-k64-bf16", 4, 4, 48, 64, 64, "bfloat16", None, 0),
    ("int4-one-group-k96-masked", 4, 2, 16, 96, 96, "float32", None, 0),  # a 128-wide sub-block, 96 valid
    ("int8-g256-two-sub-blocks", 8, 1, 16, 512, 256, "float32", 2, 0),
    ("int8-empty-splits", 8, 1, 24, 160, 32, "float32", 4, 0),  # 5 groups in 4 splits of 2: the last is empty
    ("int4-fp16-rows2", 4, 2, 36, 128, 32, "float16", 2, 0),
    ("int8-gathered-fp32", 8, 7, 24, 128, 32, "float32", None, 6),
    ("int4-gathered-bf16", 4, 7, 40, 128, 64, "bfloat16", 2, 6),
    ("int4-gathered-one-group", 4, 5, 20, 64, 64, "float32", None, 4),
]
# gathered rows use experts 0, 3 and the last only: the others get no rows
GATHER_PATTERN = [0, 0, 3, -1, 3, 0, -1]


def make_case(bits, M, N, K, g, dtype, experts, seed, device="cpu"):
    """Random weights quantised by deepmoe's own encoder, x as a column slice of a wider tensor (rows not
    contiguous), and for gathered cases idx; → (x, codes, scales, idx, dequantised fp64 weight per row)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (experts, N, K) if experts else (N, K)
    codes, scales = encode(torch.randn(shape, generator=gen), QuantScheme(f"int{bits}", g))
    x = torch.randn(M, K + 8, generator=gen)[:, 3:K + 3].to(getattr(torch, dtype))
    idx = torch.tensor([e % experts for e in GATHER_PATTERN[:M]]) if experts else None
    w = decode(codes, scales, bits, torch.float64)
    w_rows = w[idx] if experts else w.expand(M, N, K)  # (M, N, K)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(codes), to(scales), to(idx), w_rows


def errors(got, ref, x, w_rows, dtype: str) -> dict:
    """max |kernel − exact| / bound and max |kernel − reference| / bound (≤ 1 passes), and how large the
    bound is against the output."""
    exact = (x.double().cpu().unsqueeze(1) @ w_rows.mT).squeeze(1)  # (M, N)
    S = (x.double().cpu().abs().unsqueeze(1) @ w_rows.abs().mT).squeeze(1)
    got, ref = got.double().cpu(), ref.double().cpu()
    if dtype == "float32":
        b_exact = b_ref = 2.0 ** -18 * S
    else:
        u = UNIT[getattr(torch, dtype)]
        b_exact, b_ref = 2 * u * exact.abs() + 2.0 ** -20 * S, 4 * u * S
    return {"vs_exact": ((got - exact).abs() / b_exact).max().item(),
            "vs_reference": ((got - ref).abs() / b_ref).max().item(),
            "bound_over_output": (b_ref.max() / exact.abs().max()).item()}


@contextlib.contextmanager
def no_host_syncs(device: str):
    """On CUDA any host sync inside raises (what a CUDA graph capture needs); elsewhere nothing."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def run_case(name, bits, M, N, K, g, dtype, num_splits, experts, device="cpu") -> dict:
    from deepmoe.kernels.quant_matmul import quant_matmul, quant_matmul_reference

    x, codes, scales, idx, w_rows = make_case(bits, M, N, K, g, dtype, experts, seed=len(name), device=device)
    quant_matmul(x, codes, scales, bits, idx, use_triton=True, num_splits=num_splits)  # compile before the guard
    with no_host_syncs(device):
        got = quant_matmul(x, codes, scales, bits, idx, use_triton=True, num_splits=num_splits)
    ref = quant_matmul_reference(x, codes, scales, bits, idx)
    return {"dtype": str(got.dtype).removeprefix("torch."), "shape": list(got.shape),
            **errors(got, ref, x, w_rows, dtype)}


def make_modules(bits, g, dtype, device="cpu", seed=0):
    """A QuantLinear (128 → 40) and QuantExperts (8 experts, d 64, inter 32) with random quantised weights."""
    torch.manual_seed(seed)
    scheme = QuantScheme(f"int{bits}", g)
    with torch.device(device):
        lin = QuantLinear(128, 40, scheme, dtype=dtype)
        experts = QuantExperts(8, 64, 32, scheme)
    set_weight(lin.quant, torch.randn(40, 128, device=device), scheme)
    for p, shape in (("gate_proj", (8, 32, 64)), ("up_proj", (8, 32, 64)), ("down_proj", (8, 64, 32))):
        set_weight(getattr(experts, p), torch.randn(shape, device=device) / 8, scheme)
    return lin.to(dtype), experts.to(dtype)


def run_modules(bits, g, dtype, device="cpu") -> dict:
    """Largest |kernel − reference| / max |reference| over QuantLinear (1 and 6 rows) and QuantExperts
    (grouped and sync-free; 3 tokens × top-2 over 8 experts leaves experts without rows)."""
    dt = getattr(torch, dtype)
    lin, experts = make_modules(bits, g, dt, device)
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(1, 1, 128, generator=gen).to(device, dt)
    x6 = torch.randn(2, 3, 128, generator=gen).to(device, dt)
    xe = torch.randn(3, 64, generator=gen).to(device, dt)
    idx = torch.tensor([[5, 1], [1, 6], [6, 5]], device=device)
    wts = torch.rand(3, 2, generator=gen).to(device, dt)
    calls = {"linear-1-row": lambda: lin(x1), "linear-6-rows": lambda: lin(x6),
             "experts-grouped": lambda: experts(xe, idx, wts),
             "experts-sync-free": lambda: experts(xe, idx, wts, sync_free=True)}
    out = {}
    with torch.no_grad():
        for name, call in calls.items():
            use_kernel(lin), use_kernel(experts)
            got = call()
            use_reference(lin), use_reference(experts)
            ref = call()
            out[name] = {"dtype": str(got.dtype).removeprefix("torch."),
                         "rel": ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()}
    return out


MODULE_CASES = [("int8", 8, 32, "float32"), ("int4", 4, 32, "float32"), ("int4-bf16", 4, 64, "bfloat16")]
MODULE_TOL = {"float32": 1e-5, "bfloat16": 3e-2}  # bf16: relative to the largest output, through 2-3 products


@pytest.fixture(scope="module")
def interpreted():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(res: dict, case) -> None:
    assert "error" not in res, res.get("error")
    name, dtype = case[0], case[6]
    assert res["dtype"] == dtype and res["shape"] == [case[2], case[3]]
    assert res["bound_over_output"] < 0.1, f"{name}: the bound would not catch a wrong result"
    assert res["vs_exact"] <= 1, f"{name}: |kernel - exact| is {res['vs_exact']:.2f}x its bound"
    assert res["vs_reference"] <= 1, f"{name}: |kernel - reference| is {res['vs_reference']:.2f}x its bound"


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_interpreted(interpreted, case):
    check(interpreted["kernel"][case[0]], case)


@needs_triton
@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_modules_on_the_kernel_match_the_reference_interpreted(interpreted, case):
    res = interpreted["modules"][case[0]]
    assert "error" not in res, res.get("error")
    for call, r in res.items():
        assert r["dtype"] == case[3]
        assert r["rel"] < MODULE_TOL[case[3]], f"{case[0]} {call}: {r['rel']:.2e}"


def test_reference_is_the_gathered_dequantised_product():
    """The reference's gathered form is row m times expert idx[m]: check it against a per-row loop."""
    from deepmoe.kernels.quant_matmul import quant_matmul

    x, codes, scales, idx, _ = make_case(4, 5, 12, 64, 32, "float32", 4, seed=0)
    got = quant_matmul(x, codes, scales, 4, idx, use_triton=False)
    for m in range(5):
        want = x[m] @ decode(codes[idx[m]], scales[idx[m]], 4).T
        torch.testing.assert_close(got[m], want)


def test_wrapper_falls_back_on_cpu_and_checks_shapes():
    from deepmoe.kernels.quant_matmul import quant_matmul, quant_matmul_reference

    x, codes, scales, _, _ = make_case(8, 2, 16, 64, 32, "float32", 0, seed=0)
    assert torch.equal(quant_matmul(x, codes, scales, 8), quant_matmul_reference(x, codes, scales, 8))  # CPU default
    with pytest.raises(ValueError, match="shapes disagree"):
        quant_matmul(x[:, :32], codes, scales, 8)
    with pytest.raises(ValueError, match="shapes disagree"):
        quant_matmul(x, codes, scales, 4)  # int8 codes read as int4: K would be 128
    with pytest.raises(ValueError, match="need idx"):
        quant_matmul(x, codes.unsqueeze(0), scales.unsqueeze(0), 8)


def test_modules_keep_the_reference_on_cpu():
    """Without a forced switch nothing on the CPU reaches Triton: the product is the dequantised one."""
    lin, _ = make_modules(8, 32, torch.float32)
    assert lin.quant.kernel is None
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ decode(lin.quant.qweight, lin.quant.scales, 8).T)


@needs_triton
def test_kernel_on_cpu_needs_the_interpreter():
    mod = importlib.import_module("deepmoe.kernels.quant_matmul")
    if type(mod._qmm).__name__ == "InterpretedFunction":
        pytest.skip("this process imported the kernels under TRITON_INTERPRET=1")
    x, codes, scales, _, _ = make_case(8, 1, 16, 64, 32, "float32", 0, seed=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mod.quant_matmul(x, codes, scales, 8, use_triton=True)


# ---- CUDA: the same cases natively (bf16 tl.dot), large shapes, no host syncs, CUDA graph replay ----

CUDA_CASES = CASES + [
    ("int8-4096-gemv-bf16", 8, 1, 4096, 4096, 128, "bfloat16", None, 0),
    ("int4-4096-rows16-bf16", 4, 16, 4096, 4096, 128, "bfloat16", None, 0),
    ("int4-expert-gathered-bf16", 4, 7, 512, 1024, 128, "bfloat16", None, 64),
]


@pytest.mark.cuda
@cuda
@needs_triton
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_kernel_matches_reference_cuda(case):
    check(run_case(*case, device="cuda"), case)


@pytest.mark.cuda
@cuda
@needs_triton
@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_modules_on_the_kernel_match_the_reference_cuda(case):
    for call, r in run_modules(*case[1:], device="cuda").items():
        assert r["rel"] < MODULE_TOL[case[3]], f"{case[0]} {call}: {r['rel']:.2e}"


@pytest.mark.cuda
@cuda
@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_modules_replay_in_a_cuda_graph(bits):
    """QuantLinear and QuantExperts(sync_free) on the kernel, captured once, replayed with new inputs and
    routing written into the same tensors: equal to the reference modules each time."""
    lin, experts = make_modules(bits, 32, torch.bfloat16, device="cuda")
    assert lin.quant.kernel is None  # the default on CUDA: the kernel, as the engine runs it
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    xe = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([[0, 3], [3, 7]], device="cuda")
    wts = torch.rand(2, 2, device="cuda", dtype=torch.bfloat16)

    def step():
        return lin(x), experts(xe, idx, wts, sync_free=True)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile and warm up off the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_lin, out_exp = step()
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            x.copy_(torch.randn(x.shape, generator=g))
            xe.copy_(torch.randn(xe.shape, generator=g))
            idx.copy_(torch.randperm(8, generator=g)[:4].view(2, 2))
            wts.copy_(torch.rand(wts.shape, generator=g))
            graph.replay()
            use_reference(lin), use_reference(experts)
            want_lin, want_exp = step()
            use_kernel(lin, None), use_kernel(experts, None)
            for got, want in ((out_lin, want_lin), (out_exp, want_exp)):
                rel = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                assert rel < MODULE_TOL["bfloat16"], rel


if __name__ == "__main__":  # the interpreter child: every case, one JSON line of results
    torch.set_num_threads(1)
    results = {"kernel": {}, "modules": {}}
    for case in CASES:
        try:
            results["kernel"][case[0]] = run_case(*case)
        except Exception as e:  # report per case, so one failure does not hide the others
            results["kernel"][case[0]] = {"error": f"{type(e).__name__}: {e}"}
    for name, *args in MODULE_CASES:
        try:
            results["modules"][name] = run_modules(*args)
        except Exception as e:
            results["modules"][name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))
