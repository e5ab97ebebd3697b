from setuptools import setup

setup(
    name="tinytensor-gpt",
    version="0.1.0",
    description="A from-scratch reverse-mode autograd library on NumPy/CuPy and the GPT of "
                "Karpathy's 'Let's build GPT' lecture, checked against PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["tinytensor", "tinytensor.ops", "tinytensor.nn", "tinytensor.kernels", "gpt"],
    python_requires=">=3.10",
    # regex: the \p{L}-style patterns that pre-split text for the BPE tokenizer
    install_requires=["numpy>=1.24", "tqdm", "matplotlib", "threadpoolctl", "regex"],
    extras_require={
        # torch is a test-only dependency: the CPU build is enough (see README); ruff: the linter;
        # tiktoken: the BPE tokenizer is checked against it (and encodes through it when present)
        "test": ["pytest", "hypothesis", "torch", "ruff", "tiktoken"],
        # mpich: the MPICH wheel, which gives mpirun (leave it out to use a cluster's own MPI);
        # threadpoolctl: BLAS threads per rank
        "mpi": ["mpi4py", "mpich", "threadpoolctl"],
        # CUDA 12 drivers; for CUDA 13 drivers install cupy-cuda13x instead
        "gpu": ["cupy-cuda12x"],
        # the accelerators of the fused ops on the CPU (tinytensor/kernels/): compiled loops for
        # layer norm, cross-entropy, bias + ReLU, causal softmax and embedding gradients, and the
        # work split over threads; without it every fused op runs its reference (fused.py)
        "fast": ["numba"],
        # Intel MKL for the linear layers' products on the CPU (tinytensor/kernels/mkl.py), used by
        # default on Intel CPUs, where it is faster than NumPy's OpenBLAS (about 700 MB; x86 only)
        "mkl": ["mkl; platform_machine == 'x86_64' or platform_machine == 'AMD64'"],
    },
)
