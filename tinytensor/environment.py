"""The one module of tinytensor that reads (or sets) the process environment. Its variables:

    PMI_RANK PMI_SIZE OMPI_COMM_WORLD_SIZE PMIX_RANK MPI_LOCALNRANKS
        set by mpirun / mpiexec (MPICH, Open MPI, PMIx): launched_under_mpi()
    OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS
        a thread count the user gave the BLAS library: blas_threads_given()
    CUPY_TF32
        CuPy's switch for TF32 float32 matmuls, which CuPy reads at its first float32 matmul:
        tf32() and use_tf32()
    OPENBLAS_THREAD_TIMEOUT
        how long OpenBLAS's idle threads busy-wait: blas_thread_timeout_given(), and
        with_blas_thread_timeout() for kernels/threads.py's quiet_blas()
    KMP_BLOCKTIME
        how long Intel OpenMP's idle threads (MKL's, kernels/mkl.py) busy-wait:
        omp_blocktime_given()

Every other run-time choice (the accelerators, the overlap and bucket size of the gradient
reduction, BLAS threads per rank, the distributed backend) is an argument of the function that
makes it, and malloc tuning is tinytensor.malloc.automatic; train.py takes them from its
config, which it prints in the run's header and saves in every checkpoint.
"""
import os

MPI_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
BLAS_THREAD_TIMEOUT_VAR = "OPENBLAS_THREAD_TIMEOUT"


def launched_under_mpi():
    """True when this process was started by mpirun/mpiexec (without importing mpi4py)."""
    return any(k in os.environ for k in MPI_LAUNCHER_VARS)


def blas_threads_given():
    """The name of the BLAS thread variable the user set (e.g. 'OMP_NUM_THREADS'), or None."""
    return next((k for k in BLAS_THREAD_VARS if os.environ.get(k)), None)


def tf32():
    """Whether CuPy runs float32 matmuls on TF32 tensor cores (CUPY_TF32 > 0)."""
    try:
        return int(os.environ.get("CUPY_TF32", "0")) > 0
    except ValueError:
        return False


def use_tf32(flag):
    """TF32 float32 matmuls on (True) or off (False) in CuPy, through CUPY_TF32: call it before
    the first float32 matmul on the GPU, which is when CuPy reads it."""
    os.environ["CUPY_TF32"] = "1" if flag else "0"


def blas_thread_timeout_given():
    """Whether the user set OPENBLAS_THREAD_TIMEOUT (then tinytensor leaves it alone)."""
    return bool(os.environ.get(BLAS_THREAD_TIMEOUT_VAR))


def omp_blocktime_given():
    """Whether the user set KMP_BLOCKTIME (then kernels/mkl.py leaves Intel OpenMP's alone)."""
    return bool(os.environ.get("KMP_BLOCKTIME"))


def with_blas_thread_timeout(value, fn):
    """fn() with OPENBLAS_THREAD_TIMEOUT set to value (for OpenBLAS's openblas_read_env, which
    reads it), the environment restored afterwards."""
    os.environ[BLAS_THREAD_TIMEOUT_VAR] = str(value)
    try:
        return fn()
    finally:
        del os.environ[BLAS_THREAD_TIMEOUT_VAR]
