"""Training on more than one device, applied to a built single-device model (the model package knows none
of it): a device mesh (mesh.py), expert parallelism (expert_parallel.py), FSDP2 and the order the transforms
go on in (parallelize.py), and what a data-parallel training step needs besides (training.py)."""

from .mesh import ParallelError, ParallelMesh, build_mesh, init_distributed
from .parallelize import ParallelConfig, parallelize

__all__ = ["ParallelConfig", "ParallelError", "ParallelMesh", "build_mesh", "init_distributed", "parallelize"]
