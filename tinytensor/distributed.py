"""Data-parallel training over MPI (mpi4py), imported only when used.

SKELETON: single-process semantics only; the MPI implementation is being written.
Without mpirun none of this touches MPI: world_size() is 1 and every collective is the
identity, so train.py can call these unconditionally.
"""
import os

_comm = None


def launched_under_mpi():
    """True when this process was started by mpirun/mpiexec (checked from the environment,
    without importing mpi4py)."""
    keys = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    return any(k in os.environ for k in keys)


def init():
    """Start MPI when launched under mpirun; a no-op in a single process."""
    return None


def rank():
    return 0


def world_size():
    return 1


def is_main():
    return rank() == 0


def barrier():
    pass


def broadcast_parameters(model, root=0):
    pass


def allreduce_gradients(params):
    pass


def allreduce_mean(value):
    """Mean of a float or array over ranks."""
    return value


def all_true(flag):
    """Logical AND of a bool over ranks (used to stop every rank on a non-finite loss)."""
    return bool(flag)


def check_consistent(config, params):
    """Raise naming the rank whose config or parameter checksums differ from rank 0's."""
    pass
