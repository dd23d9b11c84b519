"""`deepmoe` as torchrun starts it, with one failure injected for test_distributed_checkpoint.py's elastic test:
rank 1 exits (status 1, no cleanup) when it is about to take step DEEPMOE_TEST_CRASH_STEP + 1, once — the
file DEEPMOE_TEST_CRASH_MARKER records that it did, so the restarted attempt runs through. The hook lives here,
not in deepmoe: the library has no test switches."""

import os
import sys
from pathlib import Path

from deepmoe.cli import main
from deepmoe.train import loop

crash_after = int(os.environ["DEEPMOE_TEST_CRASH_STEP"])
marker = Path(os.environ["DEEPMOE_TEST_CRASH_MARKER"])
train_step = loop.Trainer.train_step


def train_step_or_die(self):
    if os.environ["RANK"] == "1" and self.state["step"] == crash_after and not marker.exists():
        marker.write_text(f"rank 1 exited before step {crash_after + 1}")
        os._exit(1)
    return train_step(self)


loop.Trainer.train_step = train_step_or_die
sys.exit(main(sys.argv[1:]))
