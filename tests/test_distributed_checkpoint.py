"""deepmoe.parallel.checkpoint and .elastic on CPU with gloo: sharded (DCP) checkpoints resumed on other world
sizes and layouts, a crash during a save, damaged shards, and a worker killed under `torchrun --max-restarts`.

The micro model, corpus and tolerances are test_distributed.py's: a resumed run adds the same fp32 terms as the
run it continues, but with a world size of 1 instead of 2 (or another expert layout) it sums them in another
order, so its next losses match the uninterrupted run's within LOSS_RTOL = 2e-6 relative and its grad norms
within NORM_RTOL = 1e-5 (measured below 5e-7 absolute on losses of ~7); the expert loads are integers and
equal exactly. A checkpoint that lost its moments, its RNG or its sampler position moves the next loss by far
more than that (the moments alone: ~1e-2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from deepmoe.checkpoint import load_pretrained
from deepmoe.config import ModelConfig
from deepmoe.parallel.checkpoint import DCP_DIR, ShardError, export_pretrained
from deepmoe.train import loop
from deepmoe.train.config import resolve
from deepmoe.train.state import list_checkpoints

from .test_distributed import STEPS, TIMEOUT_S, _assert_same_steps, _free_port, _train_config, _worker, launch, micro

__all__ = ["micro"]  # the module fixture, shared with test_distributed.py

AFTER = 2  # steps compared after a resume


def _trainer(argv: dict, out: Path, resume=False, model_cfg: ModelConfig | None = None, **kw) -> loop.Trainer:
    cfg, resolved = resolve(_train_config(argv, out, steps=STEPS + AFTER, **kw), False)
    return loop.Trainer(cfg, model_cfg or resolved, resume)


def _save_and_go_on(rank: int, argv: dict, out: str, ep: int) -> None:
    """The uninterrupted 2-rank run: STEPS steps, a sharded checkpoint, AFTER more steps (the reference)."""
    trainer = _trainer(argv, Path(out), ep=ep)
    records = [trainer.train_step() for _ in range(STEPS)]
    trainer.save()
    # the export final/ gets, of the weights just checkpointed: rank 0 writes, every rank gathers
    export_pretrained(trainer.model, Path(f"{out}-export") if rank == 0 else None, max_shard_size=2**18)
    records += [trainer.train_step() for _ in range(AFTER)]
    trainer.dist.close()
    Path(f"{out}-rank{rank}.json").write_text(json.dumps(records))


def _resume_and_step(rank: int, argv: dict, runs: list[tuple[str, int]]) -> None:
    """Resume each (run directory, ep) in turn on these ranks and take AFTER steps."""
    trainer = None
    for out, ep in runs:
        trainer = _trainer(argv, Path(out), resume=True, ep=ep)
        records = [trainer.train_step() for _ in range(AFTER)]
        Path(f"{out}-resumed-rank{rank}.json").write_text(json.dumps(records))
    trainer.dist.close()


@pytest.fixture(scope="module")
def sharded_run(micro):
    """A 2-rank --ep 2 run with a DCP checkpoint at step STEPS, and its records of steps 1..STEPS+AFTER."""
    root, argv = micro
    out = root / "ep2"
    launch(2, _save_and_go_on, argv, str(out), 2)
    records = [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in range(2)]
    timings = ("tok_per_s", "elapsed_s")
    figures = [[{k: v for k, v in r.items() if k not in timings} for r in rank] for rank in records]
    assert figures[0] == figures[1]  # every rank logs the same global figures
    return out, records[0]


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_the_checkpoint_is_sharded_by_rank(sharded_run):
    out, _ = sharded_run
    ckpt = list_checkpoints(out)[-1]
    assert ckpt.name == f"step-{STEPS:07d}"
    # each rank wrote its own shards; no model.safetensors, nothing gathered
    assert sorted(p.name for p in (ckpt / DCP_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(ckpt.glob("*.safetensors"))
    state = json.loads((ckpt / "trainer_state/state.json").read_text())
    assert (state["format"], state["world_size"], state["step"]) == ("dcp", 2, STEPS)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_sharded_checkpoint_resumes_on_one_process_and_on_another_layout(micro, sharded_run, tmp_path):
    """Saved by 2 ranks with --ep 2 (experts split by rank, no FSDP on them); resumed on 1 process, and on 2
    ranks with --ep 1 (every expert FSDP-sharded over both): the next losses are the uninterrupted run's.
    The same launch resumes a one-process checkpoint on 2 ranks with --ep 2."""
    root, argv = micro
    out, whole = sharded_run
    fsdp = _copy(out, tmp_path / "ep1")
    one = _trainer(argv, _copy(out, tmp_path / "one"), resume=True, ep=1)
    assert one.dist is None
    # the sharded run's export holds exactly the weights the checkpoint gave this process
    exported = load_pretrained(Path(f"{out}-export")).state_dict()
    assert exported.keys() == one.model.state_dict().keys()
    for name, t in one.model.state_dict().items():
        assert torch.equal(exported[name], t), name
    assert len(list(Path(f"{out}-export").glob("model-*-of-*.safetensors"))) > 1  # streamed in several shards
    _assert_same_steps([one.train_step() for _ in range(AFTER)], whole[STEPS:])

    # a one-process run: its checkpoint (safetensors) at STEPS, and its own next steps as the reference
    single = tmp_path / "single"
    t = _trainer(argv, single)
    [t.train_step() for _ in range(STEPS)]
    t.save()
    t.saves.wait()
    single_next = [t.train_step() for _ in range(AFTER)]

    launch(2, _resume_and_step, argv, [(str(fsdp), 1), (str(single), 2)], timeout=TIMEOUT_S * 2)
    for rank in range(2):
        _assert_same_steps(json.loads(Path(f"{fsdp}-resumed-rank{rank}.json").read_text()), whole[STEPS:])
        _assert_same_steps(json.loads(Path(f"{single}-resumed-rank{rank}.json").read_text()), single_next)


def _crash_while_saving(rank: int, argv: dict, out: str) -> None:
    """Checkpoint at step 2, a step, then rank 1 dies in the middle of writing its shards of step 3."""
    import torch.distributed.checkpoint.filesystem as fs

    trainer = _trainer(argv, Path(out), checkpoint_every=2)
    trainer.train_step(), trainer.train_step()
    trainer.save()
    record = trainer.train_step()
    Path(f"{out}-rank{rank}.json").write_text(json.dumps(record))
    real = fs._write_item

    def dying(*args, **kwargs):
        result = real(*args, **kwargs)
        if rank == 1:
            os._exit(1)  # a hard crash: no exception handler, no cleanup, after part of the shard is written
        return result

    fs._write_item = dying
    trainer.save()
    raise AssertionError("the save survived the crash")


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(micro):
    root, argv = micro
    out = root / "crash"
    ctx = mp.start_processes(_worker, args=(2, _free_port(), _crash_while_saving, (argv, str(out))), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:  # rank 1 exits with 1; the launcher then ends rank 0, as torchrun would
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            assert time.monotonic() < deadline, "the crashed save did not end within the time limit"
    except mp.ProcessExitedException as e:
        assert e.error_index == 1 and e.exit_code == 1, e
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    assert [c.name for c in list_checkpoints(out)] == ["step-0000002"]
    trainer = _trainer(argv, out, resume=True, checkpoint_every=2)  # one process, from the sharded step 2
    assert trainer.state["step"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # the crash's temp, removed
    _assert_same_steps([trainer.train_step()], [json.loads(Path(f"{out}-rank0.json").read_text())])


@pytest.mark.parametrize("damage,message", [
    ("missing", r"__1_0\.distcp is missing \(written by rank 1 of 2; found by rank 0\)"),
    ("truncated", r"__0_0\.distcp has \d+ bytes, \d+ were written \(written by rank 0 of 2"),
    ("corrupt", r"__1_0\.distcp is corrupt .* \(written by rank 1 of 2; found by rank 0\)"),
])
def test_a_damaged_shard_is_named(micro, sharded_run, tmp_path, damage, message):
    root, argv = micro
    run = _copy(sharded_run[0], tmp_path / damage)
    shards = list_checkpoints(run)[-1] / DCP_DIR
    if damage == "missing":
        (shards / "__1_0.distcp").unlink()
    elif damage == "truncated":
        with open(shards / "__0_0.distcp", "r+b") as f:
            f.truncate(f.seek(0, 2) - 100)
    else:
        data = bytearray((shards / "__1_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0xFF  # one byte in a tensor's data: torch.load alone would not notice
        (shards / "__1_0.distcp").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=message):
        _trainer(argv, run, resume=True)


def test_resuming_with_another_model_config_is_refused(micro, sharded_run, tmp_path):
    root, argv = micro
    run = _copy(sharded_run[0], tmp_path / "other")
    cfg, model_cfg = resolve(_train_config(argv, run), False)
    other = ModelConfig.from_hf_dict({**model_cfg.to_hf_dict(), "moe_intermediate_size": 48})
    with pytest.raises(ValueError, match=r"another config .*moe_intermediate_size: 32 saved, 48 now"):
        _trainer(argv, run, resume=True, model_cfg=other)


# ---- elastic restart under torchrun -------------------------------------------------------------------------
def test_a_killed_worker_is_restarted_and_the_run_resumes(micro, tmp_path):
    """torchrun --max-restarts 1: rank 1 exits before step 6 once; torchrun restarts both workers, which resume
    from the step-4 checkpoint (one step lost, and said so) and finish the 6 steps with final/ written."""
    root, argv = micro
    out, marker = tmp_path / "elastic", tmp_path / "crashed-once"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in argv.items()
             if k not in ("progress", "plots", "sample_tokens", "steps", "checkpoint_every", "model_config")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", str(Path(__file__).with_name("elastic_worker.py")),
           "train", f"--config={argv['model_config']}", *flags, "--steps=6", "--checkpoint-every=2", "--ep=2",
           "--device=cpu", "--no-progress", "--no-plots", "--sample-tokens=0", f"--out={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DEEPMOE_TEST_CRASH_STEP="5", DEEPMOE_TEST_CRASH_MARKER=str(marker),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S * 2)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert marker.read_text() == "rank 1 exited before step 6"
    assert ("restart   elastic restart 1 (TORCHELASTIC_RESTART_COUNT): resuming from step-0000004 (step 4); the "
            "failed attempt had logged step 5, so 1 step will be taken again") in log
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lost step logged once, by the attempt that finished
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    # the export of the sharded run: one Hugging Face directory, read by deepmoe and by transformers alike
    model = load_pretrained(out / "final").eval()
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x).logits, rtol=1e-4, atol=1e-4)
