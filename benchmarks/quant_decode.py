"""Batch-1 decode with int8 / int4 weights against bf16, and the quantised matmul kernel against a bf16 matmul,
in one process on one device: issue #14's speed goal is int8 ≥ 1.5× and int4 ≥ 1.8× bf16 decode tokens/s.

    python benchmarks/quant_decode.py --device cuda --preset ref-813M      # the GPU figures
    python benchmarks/quant_decode.py                                       # tiny on the CPU: proves it runs

Decode: one model of --preset with random weights built on the device in bf16 (fp32 on CPU), and two copies
quantised in place by `quantize_model` (int8 and int4, --group-size); each runs in its own LLMEngine (CUDA
graphs on CUDA: the quantised projections and the routed experts' sync-free path run the Triton kernel
inside them). Before timing, each quantised model's logits with the kernel are compared with the same model
on the torch reference (a prefill and a decode-sized forward); the three engines then alternate for --rounds
rounds and the median decode step is reported (the prompt's prefill excluded), with ratios over bf16.

Kernel: y = x @ Wᵀ for a 4096×4096 weight and an expert-sized one (--preset's routed expert, gate/up shape),
M = 1 and 16 rows: bf16 F.linear, the kernel on int8 and int4 codes, and the reference (dequantise, then
matmul). Each is checked against the reference first; timed with CUDA events, median of --iters calls, the
weights rotated over enough copies to exceed the L2 cache so each call reads them from HBM.

On the CPU the kernel runs in Triton's interpreter (set here before anything imports Triton), so the CPU
times say nothing about speed; the decode models take the reference path there.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=200, help="timed calls per kernel measurement (CUDA)")
    p.add_argument("--no-decode", action="store_true", help="the kernel micro-benchmark only")
    return p.parse_args(argv)


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before deepmoe.kernels defines its @triton.jit functions

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import time_calls  # noqa: E402  (benchmarks/, the script's folder, is on sys.path)

from deepmoe.config import ModelConfig  # noqa: E402
from deepmoe.engine.llm import LLMEngine  # noqa: E402
from deepmoe.engine.sequence import SamplingParams  # noqa: E402
from deepmoe.kernels.quant_matmul import kernel_available, quant_matmul, quant_matmul_reference  # noqa: E402
from deepmoe.model import build_model  # noqa: E402
from deepmoe.quant import QuantScheme, quantize_model, use_kernel, use_reference  # noqa: E402
from deepmoe.quant.scheme import encode  # noqa: E402
from deepmoe.tokenizer import train_bpe  # noqa: E402

SCHEMES = ("int8", "int4")
L2_BYTES = 256 * 2**20  # rotate weights over more than any L2 (50 MB on H100, 60 MB on H200)


def median_ms(fn, iters: int, device: torch.device) -> float:
    """Median milliseconds of one call: CUDA events per call on the GPU, wall clock on the CPU."""
    fn()
    if device.type != "cuda":
        return 1e3 * statistics.median(time_calls(fn, max(1, iters), device))
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def kernel_bench(shapes: list[tuple[str, int, int]], rows: list[int], args, device, dtype) -> list[str]:
    """Per (shape, M): ms and GB/s of bf16, int8 and int4 kernels and the reference; → ratio lines."""
    lines = []
    dense = f"{str(dtype).removeprefix('torch.').replace('bfloat', 'bf').replace('float', 'fp')} F.linear"
    print(f"\n{'weight':<22} {'M':>3} {'variant':<16} {'ms':>9} {'weight GB/s':>12} {'vs dense':>8}")
    for label, N, K in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(N, K, device=device, generator=gen) / K ** 0.5
        variants = {dense: (w.to(dtype), None, None)}
        for s in SCHEMES:
            codes, scales = encode(w, QuantScheme(s, min(args.group_size, K)))
            variants[s] = (codes, scales, 8 if s == "int8" else 4)
        for M in rows:
            x = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
            ms = {}
            for name, (t, scales, bits) in variants.items():
                nbytes = t.nbytes + (0 if scales is None else scales.nbytes)
                copies = max(1, min(64, L2_BYTES // nbytes)) if device.type == "cuda" else 1
                ts = [t.clone() for _ in range(copies)]
                ss = [scales.clone() for _ in range(copies)] if scales is not None else [None] * copies
                it = iter(range(10**12))
                if bits is None:
                    def call():
                        i = next(it) % copies
                        return F.linear(x, ts[i])
                    todo = [(name, call)]
                else:
                    want = quant_matmul_reference(x, t, scales, bits)
                    got = quant_matmul(x, t, scales, bits, use_triton=True)
                    err = rel(got, want)
                    if err > 2e-2:
                        raise SystemExit(f"{label} M {M} {name}: kernel differs from the reference by {err:.2e}")

                    def call(bits=bits):
                        i = next(it) % copies
                        return quant_matmul(x, ts[i], ss[i], bits, use_triton=True)

                    def ref(bits=bits):
                        i = next(it) % copies
                        return quant_matmul_reference(x, ts[i], ss[i], bits)
                    todo = [(f"{name} kernel", call), (f"{name} reference", ref)]
                for vname, fn in todo:
                    ms[vname] = median_ms(fn, args.iters if device.type == "cuda" else 2, device)
                    gbs = nbytes / (ms[vname] * 1e-3) / 1e9
                    print(f"{label:<22} {M:>3} {vname:<16} {ms[vname]:9.4f} {gbs:12.1f} "
                          f"{ms[dense] / ms[vname]:8.2f}", flush=True)
            for s in SCHEMES:
                lines.append(f"kernel {label}, M {M}: {s} / {dense.split()[0]} {ms[dense] / ms[s + ' kernel']:.2f}x "
                             f"(reference {ms[dense] / ms[s + ' reference']:.2f}x)")
    return lines


def decode_bench(args, device, dtype) -> list[str]:
    cfg = ModelConfig.from_preset(args.preset).replace(num_nextn_predict_layers=0)
    base = build_model(cfg, device=device, dtype=dtype, seed=0).eval()
    models = {str(dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp"): base}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
    for s in SCHEMES:
        m = copy.deepcopy(base)
        quantize_model(m, QuantScheme(s, args.group_size))
        # the kernel path (CUDA) against the reference: a prefill, and a decode-sized forward of 8 tokens
        for ids in (torch.tensor([prompt], device=device), torch.tensor([prompt[:8]], device=device)):
            with torch.no_grad():
                got = m(ids)
                use_reference(m)
                want = m(ids)
                use_kernel(m, None)
            err = rel(got, want)
            print(f"{s}: logits with the kernel vs the reference, {ids.shape[1]} tokens: max rel diff {err:.2e}")
            if err > 5e-2:
                raise SystemExit(f"{s}: the quantised model on the kernel differs from the reference ({err:.2e})")
        models[s] = m
    tok = train_bpe(["x"], 300)
    engines = {name: LLMEngine(m, tok, kv_cache_bytes=64 * 2**20, block_size=16, max_num_seqs=1)
               for name, m in models.items()}
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)

    def decode_only(engine) -> float:
        """Median seconds of one decode step (the prompt's prefill is not a decode step)."""
        engine.blocks.reset_prefix_cache()
        engine.add(prompt, params, "bench")
        engine.step()  # prefill and the first token
        steps = time_calls(lambda: engine.step(), args.new_tokens - 1, device)
        while engine.scheduler.has_unfinished():
            engine.step()
        return statistics.median(steps)

    for engine in engines.values():
        decode_only(engine)  # warm-up: Triton compiles, graphs are captured
    per_step = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            per_step[name].append(decode_only(engine))
    rate = {name: 1 / statistics.median(v) for name, v in per_step.items()}
    graphs = all(e.runner.decoder is not None and e.runner.decoder.mode == "graphs" for e in engines.values())
    print(f"\n{args.preset} (random weights), batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"group size {args.group_size}, CUDA graphs {'on' if graphs else 'off'}")
    first, *_ = rate
    lines = []
    for name, r in rate.items():
        print(f"{name:<6} {r:10.1f} tok/s (median decode step, median of {args.rounds} rounds)")
    for s in SCHEMES:
        lines.append(f"decode {args.preset} batch 1: {s} / {first} {rate[s] / rate[first]:.2f}x")
    return lines


def main(args) -> int:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if not kernel_available():
        print("triton is not installed: the kernel cannot run here", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} threads; Triton interpreter: times are not speeds)")
    print(f"device {where}, torch {torch.__version__}, x in {str(dtype).removeprefix('torch.')}")
    cfg = ModelConfig.from_preset(args.preset)
    expert = (f"expert {cfg.moe_intermediate_size}x{cfg.hidden_size}", cfg.moe_intermediate_size, cfg.hidden_size)
    if device.type == "cuda":
        shapes, rows = [("4096x4096", 4096, 4096), expert], [1, 16]
    else:
        shapes, rows = [("256x256", 256, 256), expert], [1, 16]
    lines = kernel_bench(shapes, rows, args, device, dtype)
    if not args.no_decode:
        lines += decode_bench(args, device, dtype)
    print()
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
