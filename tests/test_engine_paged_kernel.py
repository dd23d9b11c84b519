"""The static decode step attending through the Triton paged kernel (run by the Triton interpreter on a
CPU) gives exactly the general engine's greedy tokens, plain and speculative (two queries per row in the
verify step, and the MTP drafting step: the same drafts). Triton reads TRITON_INTERPRET when the kernels are
first defined, so the comparison runs in a child process started with it: this file is also that script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_static_decode_through_the_paged_kernel_equals_the_engine():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kernel_calls"] > 0
    assert result["paged"] == result["general"]
    assert result["spec_paged"] == result["spec_general"]


def _child() -> None:
    import torch

    from deepmoe.engine.decode_step import StaticDecoder
    from deepmoe.engine.llm import LLMEngine
    from deepmoe.engine.sequence import SamplingParams
    import deepmoe.kernels as kernels
    from deepmoe.model import build_model
    from deepmoe.tokenizer import train_bpe
    from tests.conftest import v3_config

    torch.set_num_threads(2)
    model = build_model(v3_config(num_nextn_predict_layers=1, rope_scaling=None), seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    tok = train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(40)], 300)
    prompts, lengths = [list(range(5, 30)), [7, 8, 9], list(range(100, 117))], [10, 7, 4]

    def generate(engine):
        seqs = [engine.add(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), str(i))
                for i, (p, n) in enumerate(zip(prompts, lengths))]
        while engine.scheduler.has_unfinished():
            engine.step()
        return [s.completion_token_ids for s in seqs]

    def speculative(paged: bool):  # the tokens, and the drafts the engine verified (the MTP step's output)
        engine = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=4, speculative=True)
        if paged:
            engine.runner.decoder = StaticDecoder(model, engine.runner.cache, 4, max_blocks=12, mode="static",
                                                  paged_kernel=True, draft_tokens=1)
        return generate(engine), [engine.num_drafted, engine.num_accepted]

    general = generate(LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=4))
    spec_general = speculative(False)
    paged = LLMEngine(model, tok, kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=4)
    paged.runner.decoder = StaticDecoder(model, paged.runner.cache, 4, max_blocks=12, mode="static",
                                         paged_kernel=True)
    calls = []
    original = kernels.paged_mla_decode  # the step imports it from deepmoe.kernels at call time: count calls
    kernels.paged_mla_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    print(json.dumps({"general": general, "paged": generate(paged), "kernel_calls": len(calls),
                      "spec_general": spec_general, "spec_paged": speculative(True)}))


if __name__ == "__main__":
    _child()
