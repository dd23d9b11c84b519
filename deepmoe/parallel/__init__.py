"""Training on more than one device, applied to a built single-device model (the model package knows none
of it): a device mesh (mesh.py), expert parallelism (expert_parallel.py), FSDP2 and the order the transforms
go on in (parallelize.py), what a data-parallel training step needs besides (training.py), sharded checkpoints
and the final export (checkpoint.py), resuming after torchrun restarts the workers (elastic.py), and a plan on
paper for runs of any size (plan.py, plan_report.py: arithmetic only, no torch).

Names are imported on first use, so `deepmoe info --plan` imports neither torch nor torch.distributed."""

from importlib import import_module

_WHERE = {"ParallelConfig": "parallelize", "parallelize": "parallelize", "ParallelError": "mesh",
          "ParallelMesh": "mesh", "build_mesh": "mesh", "init_distributed": "mesh"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
