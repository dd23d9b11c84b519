"""Elastic restart: what a run does when torchrun (`--max-restarts K`, `--nnodes MIN:MAX`) starts its workers
again after one failed, or a node came or went.

torchrun kills the surviving workers and starts a fresh set, with TORCHELASTIC_RESTART_COUNT > 0 and the
same command line. The run then resumes from its newest complete checkpoint, as `--resume auto` asks
explicitly (resume if there is a checkpoint, else start): the steps taken after that checkpoint are lost and
taken again, at most one `--checkpoint-every` interval. The new world may have another size (the checkpoints
are resharded on load, parallel/checkpoint.py). `restart_note` says which step it resumed from and how many
steps were lost, from the failed attempt's metrics log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..train.state import checkpoint_step, list_checkpoints

AUTO = "auto"


def restart_count() -> int:
    """How many times torchrun has restarted this run's workers (0: the first attempt, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def resolve_resume(resume: bool | str, run_dir: Path) -> bool | str:
    """`--resume auto`, and any run torchrun restarted: True if the run has a complete checkpoint (resume from
    the newest), else False (start, replacing what a failed first attempt left). A restart ignores a named
    checkpoint (`--resume step-N` on the command line it repeats): the newer ones are this run's progress."""
    if resume == AUTO or restart_count() > 0:
        return bool(list_checkpoints(run_dir))
    return resume


def last_logged_step(run_dir: Path) -> int:
    """The last training step the run's metrics log recorded (0 if none): how far a failed attempt got."""
    last = 0
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed worker
        if record.get("kind") == "train":
            last = max(last, int(record["step"]))
    return last


def restart_note(run_dir: Path, ckpt: Path | None) -> str | None:
    """After an elastic restart (None otherwise): where this attempt starts and what the failed one lost.
    Read before the metrics log is cut back to the checkpoint."""
    n = restart_count()
    if n == 0:
        return None
    reached = last_logged_step(run_dir)
    start = 0 if ckpt is None else checkpoint_step(ckpt)
    where = f"resuming from {ckpt.name} (step {start})" if ckpt is not None else "no checkpoint yet: starting over"
    lost = max(reached - start, 0)
    return (f"elastic restart {n} (TORCHELASTIC_RESTART_COUNT): {where}; the failed attempt had logged step "
            f"{reached}, so {lost} step{'s' if lost != 1 else ''} will be taken again")
