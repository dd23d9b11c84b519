"""What `deepmoe quantize` costs and saves on one model: held-out perplexity, bytes of the quantised tensors,
and batch-1 greedy decode speed, for the model as saved (fp32 for a `deepmoe train` run), int8, int4 and fp8.

    OMP_NUM_THREADS=1 python -m benchmarks.quantization MODEL_DIR [--group-size 128] [--max-batches 40]
        [--schemes int8 int4 fp8 int8-awq int4-awq] [--extra DIR ...]

Perplexity is `deepmoe eval`'s: the held-out split the model was trained on (train_config.json beside the
weights; `deepmoe quantize` copies it), the first --max-batches batches of 8 × seq_len tokens. Decode is
the engine (`LLM`) on CPU with one sequence: the mean of --repeats runs of --new-tokens greedy tokens after
a 16-token prompt, one warm-up run first. Sizes are of the tensors quantize replaces, against the same
tensors in bf16. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from deepmoe.checkpoint import load_pretrained
from deepmoe.data import PackedDataset, read_documents, split_documents
from deepmoe.engine.llm import LLMEngine
from deepmoe.engine.sequence import SamplingParams
from deepmoe.quant import QuantScheme, quantize_checkpoint
from deepmoe.quant.calibration import calibration_tokens
from deepmoe.quant.quantize import awq_quantize_checkpoint
from deepmoe.tokenizer import load_tokenizer
from deepmoe.train.config import TrainConfig, default_cache_dir
from deepmoe.train.data import text_bytes, token_stream
from deepmoe.train.evaluate import evaluate
from deepmoe.train.state import TRAIN_CONFIG


def load(path: Path):
    """The model at `path` as every variant here runs it: CPU, fp32 (an fp8 directory would load as bf16)."""
    return load_pretrained(path, device="cpu", dtype=torch.float32, load_mtp=False)


def perplexity(path: Path, max_batches: int, model=None) -> dict:
    """On the held-out split of the run that trained the model at `path`: that model, or `model`, a
    variant of it built in memory (benchmarks/torchao_compare.py's)."""
    model = load(path) if model is None else model
    tok = load_tokenizer(path)
    saved = TrainConfig.from_json(path / TRAIN_CONFIG)
    docs = split_documents(read_documents(saved.data, saved.text_field), saved.val_fraction, saved.seed)[1]
    tokens = token_stream(docs, tok, str(Path(default_cache_dir()) / "tokens"), "eval")
    return evaluate(model, PackedDataset(tokens, saved.seq_len or 256), 8, max_batches, text_bytes(docs) / len(tokens))


def decode_runner(model, tokenizer, cuda_graphs: bool = True):
    """A warmed-up function n → None that greedily decodes n tokens at batch 1 after a fixed 16-token prompt,
    through the engine (what `LLM` runs), on the model's device. The engine reads each step's tokens back to
    the host, so a call returns after the GPU's work."""
    engine = LLMEngine(model, tokenizer, kv_cache_bytes=64 * 2**20, max_num_seqs=1, cuda_graphs=cuda_graphs)
    prompt = list(range(10, 26))

    def run(max_tokens: int) -> None:
        engine.add(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), "bench")
        while engine.scheduler.has_unfinished():
            engine.step()

    run(8)  # warm-up
    return run


def decode_speed(model, tokenizer, new_tokens: int, repeats: int) -> float:
    """Batch-1 greedy tokens/s of a built model: the mean of `repeats` runs after a warm-up."""
    run = decode_runner(model, tokenizer)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(new_tokens)
        times.append(time.perf_counter() - t0)
    return new_tokens / (sum(times) / len(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--max-batches", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--schemes", nargs="+", default=["int8", "int4", "fp8"],
                   choices=["int8", "int4", "fp8", "int8-awq", "int4-awq"],
                   help="-awq: `deepmoe quantize --awq` with the default calibration (64 windows of 256 tokens of the "
                        "model's training split)")
    p.add_argument("--extra", nargs="+", default=[], type=Path, metavar="DIR",
                   help="more model directories to score as they are (e.g. a `--qat int4` run, quantised)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("as saved", args.model, None)]
        for name in args.schemes:
            out = Path(tmp) / name
            base, awq = name.removesuffix("-awq"), name.endswith("-awq")
            scheme = QuantScheme(base, 128 if base == "fp8" else args.group_size)
            if awq:
                tokens, _ = calibration_tokens(args.model, 64, 256)
                stats = awq_quantize_checkpoint(args.model, out, scheme, tokens)
            else:
                stats = quantize_checkpoint(args.model, out, scheme)
            label = f"{base} 128x128" if base == "fp8" else f"{base} g{args.group_size}" + (" AWQ" if awq else "")
            variants.append((label, out, stats))
        variants += [(str(d), d, None) for d in args.extra]
        base_ppl = None
        for label, path, stats in variants:
            r = perplexity(path, args.max_batches)
            base_ppl = base_ppl or r["ppl"]
            tps = decode_speed(load(path), load_tokenizer(path), args.new_tokens, args.repeats)
            if stats is None:
                size = "—"
            else:
                size = (f"{stats['quantized_bytes'] / 2**20:.2f} MiB ({stats['quantized_bytes'] / stats['bf16_bytes']:.3f}×"
                        f" of {stats['bf16_bytes'] / 2**20:.2f} MiB bf16)")
            rows.append((label, f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / base_ppl - 1):+.2f}%", f"{r['bpb']:.4f}",
                         size, f"{tps:.1f}"))
            print(f"{label}: {r['tokens']} tokens", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| weights | ppl | Δ ppl | bits/byte | quantised tensors on disk | decode tok/s (batch 1, CPU) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
