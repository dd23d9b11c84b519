"""metrics.jsonl: one JSON object per training step ("kind": "train"), evaluation ("kind": "val") or change of
the run's settings on resume ("kind": "config").

Lines are flushed as they are written, so a crash loses at most the line being written. On resume the
file is cut back to what was logged when the checkpoint was saved (dropping what the interrupted run
logged after it, and any torn last line), so a resumed run's log reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..durable import atomic_write_text


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; a skipped step's non-finite loss is logged as null
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def logged_by_then(record: dict[str, Any], step: int) -> bool:
    """Whether `record` was in the log when the checkpoint of `step` was saved: every record up to that step
    but the final validation of the whole split, which is logged after the last checkpoint (a run resumed
    from it logs it again, or, made longer, at its new end). A "config" record at `step` stays: it records
    settings changed on an earlier resume from this checkpoint, which are still in force."""
    at = record.get("step", math.inf)
    return at < step or (at == step and not (record.get("kind") == "val" and record.get("full")))


class MetricsLog:
    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            self._truncate(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate(self, step: int) -> None:
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of a killed run
                if logged_by_then(record, step):
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
