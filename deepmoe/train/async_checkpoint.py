"""Checkpoints that do not stall training: a snapshot in host memory, written on a background thread.

A save has two halves. The snapshot runs on the training thread and copies everything the checkpoint
holds that training goes on changing: the model's state dict (weights and routing biases, tied weights
copied once), the AdamW moments and steps (`optimizer.step()` updates them in place) and the RNG state;
the JSON state is deep-copied. On CUDA the copies go into pinned host buffers, allocated at the first save
and reused by every later one, as non-blocking copies followed by one synchronize; CPU tensors are cloned.
Once `save()` returns, training may change the live tensors freely.

The write runs on a thread of its own and goes through the same `write_checkpoint` as a synchronous save:
the same files, names, fsyncs and atomic rename, then pruning. One save is in flight at a time: the next
save waits for the previous one (whose buffers it is about to reuse), and so must anything that reads the
checkpoints or ends the run (`wait`). A writer that failed is reported there, in the training thread, as a
CheckpointWriteError naming the checkpoint; its hidden temp directory is removed, and a process killed
mid-write leaves only that directory, which `remove_interrupted_saves` clears on the next start.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_state
from ..model import DeepSeekModel
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .state import checkpoint_path, optimizer_tensors, rng_tensors, write_checkpoint, write_run_files

log = logging.getLogger("deepmoe")


class CheckpointWriteError(RuntimeError):
    pass


class HostCopies:
    """Copies of named tensors in host memory. A CUDA tensor's copy goes into a pinned buffer kept for the
    next copy of that name (allocating pinned memory is slow, and pinned memory is what lets the copy run
    asynchronously); a CPU tensor is cloned, so nothing is held between saves."""

    def __init__(self):
        self.pinned: dict[str, torch.Tensor] = {}

    def copy(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: host copy}, complete when this returns. Views of the same memory (tied weights) share
        one copy."""
        out: dict[str, torch.Tensor] = {}
        seen: dict[tuple, torch.Tensor] = {}
        devices = set()
        for name, t in tensors.items():
            t = t.detach()
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key not in seen:
                seen[key] = self._copy(name, t)
                if t.is_cuda:
                    devices.add(t.device)
            out[name] = seen[key]
        for device in devices:  # the copies were queued behind the optimizer step on the current stream
            torch.cuda.synchronize(device)
        return out

    def _copy(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_cuda:
            return t.clone(memory_format=torch.contiguous_format)  # safetensors writes contiguous tensors
        buf = self.pinned.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.pinned[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)


class _Write:
    """One checkpoint being written on its own thread; the writer's exception is kept for the waiter."""

    def __init__(self, final: Path, write: Callable[[], Any]):
        self.final = final
        self.error: BaseException | None = None
        # not a daemon: an interpreter that exits normally finishes the write first
        self.thread = threading.Thread(target=self._run, args=(write,), name=f"deepmoe save {final.name}")
        self.thread.start()

    def _run(self, write: Callable[[], Any]) -> None:
        try:
            write()
        except BaseException as e:  # raised again by BackgroundSaves.wait, in the training thread
            self.error = e


class BackgroundSaves:
    """A trainer's checkpoints: each snapshotted by `save` on the calling thread, written in the background,
    one in flight at a time."""

    def __init__(self):
        self.host = HostCopies()
        self.pending: _Write | None = None

    def save(self, run_dir: Path, model: DeepSeekModel, optimizer: torch.optim.Optimizer, tokenizer: Tokenizer,
             cfg: TrainConfig, state: dict[str, Any], also_keep_up_to: int | None = None) -> Path:
        """Snapshot the model, optimizer, RNG and `state`, start writing checkpoint step-{state['step']}, and
        return its path (the directory appears once the write is complete: `wait`)."""
        self.wait()  # the previous write is done with the buffers this snapshot reuses
        weights = model.state_dict(keep_vars=False)
        moments = optimizer_tensors(model, optimizer)
        host = self.host.copy(weights | moments)  # model names and optim.* never collide
        weights, moments = {k: host[k] for k in weights}, {k: host[k] for k in moments}
        tensors = moments | rng_tensors()
        state = copy.deepcopy(state)  # nested dicts (health) the trainer goes on updating
        model_cfg = model.config

        def write_model(tmp: Path) -> None:
            save_state(weights, model_cfg, tmp)
            write_run_files(tmp, tokenizer, cfg)

        final = checkpoint_path(run_dir, state["step"])
        self.pending = _Write(final, lambda: write_checkpoint(run_dir, state, write_model, tensors,
                                                              cfg.keep_checkpoints, also_keep_up_to))
        return final

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; a CheckpointWriteError if its writer failed."""
        if self.pending is None:
            return
        self.pending.thread.join()  # Ctrl-C interrupts the join; the save stays pending for the next wait
        done, self.pending = self.pending, None
        if done.error is not None:
            e = done.error
            raise CheckpointWriteError(
                f"writing checkpoint {done.final} in the background failed ({type(e).__name__}: {e}); it was not "
                "saved, the checkpoints before it are intact. Fix the cause (disk space, permissions) and "
                "continue the run with --resume") from e

    def settle(self) -> None:
        """`wait` on a path that is already raising: that exception is the one to report, so a failed write
        is logged beside it instead of replacing it."""
        try:
            self.wait()
        except CheckpointWriteError as e:
            log.error("%s", e)
