"""Serving throughput: N concurrent streamed completions against `deepmoe serve` vs transformers' batched
`generate` on the same prompts, in one process.

The server runs in this process on a free loopback port (the real FastAPI app, engine thread and SSE
path); a load generator opens N streams at once, each a different random prompt of --prompt-len tokens
asking for exactly --new-tokens tokens (eos ignored). Reported: generated tokens/s over the whole burst,
time to first token and end-to-end latency percentiles. The reference is transformers (grouped_mm experts
by default, --hf-impl) generating the same N prompts as one padding-free batch (all prompts have the same
length), also exactly --new-tokens each.

    python benchmarks/serve.py                                   # tiny, random weights, CPU
    python benchmarks/serve.py --model runs/tiny/final --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from contenders import add_model_args, load_contenders  # benchmarks/ (the script's folder is on sys.path)
from timing import time_calls

from deepmoe.data.corpus import stdlib_documents
from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.tokenizer import load_tokenizer, train_bpe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread


async def one_stream(client, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """→ (time to first token, total latency, tokens received) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and ttft is None:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft or 0.0, time.perf_counter() - t0, tokens


async def burst(port: int, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    """All prompts at once from the official openai client; → wall seconds and per-request results."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, p, new_tokens) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    return wall, results


def load_generator(port: int, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    return asyncio.run(burst(port, prompts, new_tokens))


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    from deepmoe.serve.app import build_app

    models = load_contenders(args)
    device, dtype, ours, hf = models.device, models.dtype, models.ours, models.hf
    if args.model:
        tok = load_tokenizer(args.model)
    else:  # a tokenizer covering the model's vocabulary, so every token streams as text (TTFT is measurable)
        files = stdlib_documents()[:300]
        tok = train_bpe((f.read_text(errors="replace") for f in files), ours.config.vocab_size)
    engine = LLMEngine(ours, tok, max_num_seqs=args.requests, kv_cache_bytes=None if device.type == "cuda" else 2**28)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, ours.config.vocab_size, (args.requests, args.prompt_len), generator=g)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)

    def run_offline() -> None:  # the same work straight into the engine: what HTTP and streaming cost
        engine.blocks.reset_prefix_cache()
        for row in prompts.tolist():
            engine.add(row, params, "offline")
        while engine.scheduler.has_unfinished():
            engine.step()

    run_offline()
    offline_t = time_calls(run_offline, args.rounds, device)  # before the engine thread owns the engine
    server, thread = start_server(build_app(engine, "bench"), port := free_port())

    def run_ours() -> tuple[float, list]:
        engine.blocks.reset_prefix_cache()  # (the engine thread is idle between bursts)
        # the load generator is its own process, as a client would be: it does not share the server's GIL
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(load_generator, port, prompts.tolist(), args.new_tokens).result()

    def run_hf(model) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            # no eos in its generation config (contenders.py): exactly new_tokens, no extra logits processor
            out = model.generate(prompts.to(device), max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == args.prompt_len + args.new_tokens
        return time.perf_counter() - t0

    run_ours()  # warm up all
    for model in hf.values():
        run_hf(model)
    ours_t, hf_t, lat = [], {impl: [] for impl in hf}, None
    for _ in range(args.rounds):
        wall, results = run_ours()
        assert all(n == args.new_tokens for _, _, n in results), "a stream ended early"
        ours_t.append(wall)
        lat = results
        for impl, model in hf.items():
            hf_t[impl].append(run_hf(model))
    server.should_exit = True
    thread.join(30)
    total = args.requests * args.new_tokens
    ours_rate = total / statistics.median(ours_t)
    hf_rate = {impl: total / statistics.median(t) for impl, t in hf_t.items()}
    print(f"{models.describe()}, {args.requests} concurrent "
          f"requests, prompt {args.prompt_len}, {args.new_tokens} new tokens each, {str(dtype).removeprefix('torch.')}")
    ttft, e2e = [r[0] for r in lat], [r[1] for r in lat]
    print(f"deepmoe serve  {ours_rate:8.1f} tok/s over HTTP/SSE (median of {args.rounds} bursts); TTFT p50 "
          f"{pct(ttft, .5) * 1e3:.0f} ms p99 {pct(ttft, .99) * 1e3:.0f} ms; latency p50 {pct(e2e, .5):.2f} s "
          f"p99 {pct(e2e, .99):.2f} s")
    engine_rate = total / statistics.median(offline_t)
    print(f"deepmoe engine {engine_rate:8.1f} tok/s (the same requests offline, no HTTP)")
    for impl, rate in hf_rate.items():
        print(f"transformers   {rate:8.1f} tok/s (batched generate, {impl} experts, no server)")
    best = max(hf_rate, key=hf_rate.get)
    print(f"deepmoe serve / transformers {best} (fastest): {ours_rate / hf_rate[best]:.2f}x; "
          f"deepmoe engine / transformers {best}: {engine_rate / hf_rate[best]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
