"""Simulated crashes and a recorder for the file-system steps of a writer.

`crash_at(k)` makes the k-th name-changing operation (rename, replace, exchange, link, unlink, rmdir) and
every one after it raise `Crash`: the process is "dead" from then on, so no cleanup handler can tidy up
what a real crash would have left. Running a writer with k = 0, 1, 2, ... until it completes visits the
on-disk state after every step.
"""

from __future__ import annotations

import contextlib
import os

from deepmoe import durable


class Crash(Exception):
    pass


_MUTATING = ("rename", "replace", "link", "unlink", "remove", "rmdir")


@contextlib.contextmanager
def crash_at(monkeypatch, k: int):
    """Yields a list that receives the name of each operation that ran (or would have run)."""
    done: list[str] = []

    def wrap(name, real):
        def op(*args, **kwargs):
            done.append(name)
            if len(done) > k:
                raise Crash(f"crash at step {k} ({name})")
            return real(*args, **kwargs)
        return op

    with monkeypatch.context() as m:
        for name in _MUTATING:
            m.setattr(os, name, wrap(name, getattr(os, name)))
        m.setattr(durable, "_exchange", wrap("exchange", durable._exchange))
        yield done


def run_until_complete(monkeypatch, write, check, max_steps: int = 200) -> int:
    """Crash `write()` at every step in turn, calling check() on what each crash left and on the completed
    write; → the number of steps."""
    # a simulated crash loses no page cache, so fsync would only cost time here (test_durable checks it)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    for k in range(max_steps):
        completed = False
        with crash_at(monkeypatch, k) as done:
            try:
                write()
                completed = True
            except Crash:
                assert len(done) > k
        check()
        if completed:
            return k
    raise AssertionError(f"{write} did not complete within {max_steps} steps")


def record_fs(monkeypatch) -> list[tuple]:
    """Record ("fsync", path) and ("rename", src, dst) events, in order, for the rest of the test. An
    atomic directory exchange counts as a rename of the new directory onto the old name."""
    events: list[tuple] = []
    real_fsync, real_replace, real_rename, real_exchange = os.fsync, os.replace, os.rename, durable._exchange

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kw)

    def rename(src, dst, **kw):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        return real_rename(src, dst, **kw)

    def exchange(a, b):
        ok = real_exchange(a, b)
        if ok:
            events.append(("rename", os.fspath(a), os.fspath(b)))
        return ok

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(durable, "_exchange", exchange)
    return events
