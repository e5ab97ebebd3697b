"""Shared fixtures: the `device` every op test runs on, and a clean global state per test.

One suite for every device (MLX style): tests take the `device` fixture and run once per
device. By default that is 'cpu', plus 'cuda' where cupy and a GPU are usable
(tinytensor.backend.cuda_available()). TT_DEVICES picks explicitly, e.g. TT_DEVICES=cuda or
TT_DEVICES=cpu,cuda; a requested 'cuda' without a GPU is skipped with the reason.

At the end of the session the worst relative error against PyTorch per op family (see
torch_helper.py) is printed and written to /tmp/tt_worst_errors.json (or $TT_WORST_ERRORS).
TT_FAKE_CUPY=1 runs the whole session on the cupy stand-in (tests/fake_cupy.py).

The `accelerators` fixture runs a test once with the fused ops' plain references and once
with their accelerated versions (tinytensor/kernels/, needs numba); the modules of the ops that
have such versions use it for every test (pytestmark).
"""
import glob
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import torch_helper as a plain module

import tinytensor as tt  # noqa: E402
from tinytensor import backend  # noqa: E402

_tensor_mod = sys.modules["tinytensor.tensor"]  # the module (tinytensor.tensor is the function)

WORST_ERRORS_PATH = os.environ.get("TT_WORST_ERRORS", "/tmp/tt_worst_errors.json")
_merged_worst = {}


def _devices():
    env = os.environ.get("TT_DEVICES", "").strip()
    if not env:
        return ["cpu", "cuda"] if backend.cuda_available() else ["cpu"]
    devices = [d.strip() for d in env.split(",") if d.strip()]
    bad = [d for d in devices if d not in ("cpu", "cuda")]
    if bad:
        raise pytest.UsageError(f"TT_DEVICES={env!r}: unknown device(s) {bad}; use cpu and/or cuda")
    return devices


@pytest.fixture(scope="session", params=_devices())
def device(request):
    """'cpu' or 'cuda': the device the test's tensors live on."""
    if request.param == "cuda" and not backend.cuda_available():
        pytest.skip("TT_DEVICES asks for cuda, but cupy or a GPU is not available")
    return request.param


@pytest.fixture(params=["off", "on"])
def accelerators(request):
    """'off' or 'on': whether the fused ops run their plain reference (tinytensor.fused) or
    their accelerated versions (tinytensor/kernels/: compiled CPU loops, threads). Modules of ops
    that have accelerated versions use it for every test, so both paths pass the same checks;
    'on' is skipped where numba is not installed."""
    from tinytensor import kernels
    if request.param == "on" and kernels.numba_loops() is None:
        pytest.skip("numba is not installed (pip install -e \".[fast]\"): the compiled CPU loops")
    kernels.use(request.param == "on")
    yield request.param
    kernels.use(None)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Tests that change the default dtype, the grad mode or the accelerators do not leak it to
    the next test."""
    from tinytensor import kernels
    dtype, grad, accelerators = tt.get_default_dtype(), _tensor_mod._grad_enabled, kernels.use(None)
    kernels.use(accelerators)
    yield
    tt.set_default_dtype(dtype)
    _tensor_mod._grad_enabled = grad
    kernels.use(accelerators)


def pytest_report_header(config):
    return f"tinytensor devices: {', '.join(_devices())} (cuda available: {backend.cuda_available()})"


def _merge(into, worst):
    for family, per_dtype in worst.items():
        d = into.setdefault(family, {})
        for dt, err in per_dtype.items():
            d[dt] = max(d.get(dt, 0.0), err)
    return into


def _worker_files(run):
    return WORST_ERRORS_PATH.replace(".json", f".{run}.*.json")


def pytest_configure(config):
    if os.environ.get("TT_FAKE_CUPY"):  # the whole session on the cupy stand-in (fake_cupy.py)
        import fake_cupy
        fake_cupy.install()
    if not hasattr(config, "workerinput"):  # the main process: pytest-xdist workers inherit the id
        os.environ["TT_WORST_ERRORS_RUN"] = str(os.getpid())


def pytest_sessionfinish(session):
    helper = sys.modules.get("torch_helper")
    worst = dict(helper.WORST) if helper is not None else {}
    # a worker by its config, not by PYTEST_XDIST_WORKER: a pytest that a test starts (the ops
    # step of benchmarks/gpu_check.py) inherits that variable from the worker running the test,
    # and would write its worker file instead of TT_WORST_ERRORS
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    run = os.environ.get("TT_WORST_ERRORS_RUN", "")
    if worker:  # a pytest-xdist worker: the main process merges the files
        if worst:
            with open(_worker_files(run).replace("*", worker), "w") as f:
                json.dump(worst, f)
        return
    for path in glob.glob(_worker_files(run)):
        with open(path) as f:
            _merge(worst, json.load(f))
        os.remove(path)
    if worst:
        _merged_worst.update(worst)
        with open(WORST_ERRORS_PATH, "w") as f:
            json.dump(dict(sorted(worst.items())), f, indent=1)


def pytest_terminal_summary(terminalreporter):
    if not _merged_worst:
        return
    tr = terminalreporter
    tr.section("worst relative error against PyTorch per op family")
    width = max(24, 2 + max(map(len, _merged_worst)))
    tr.write_line(f"{'family':<{width}}{'float64':>12}{'float32':>12}")
    for family, d in sorted(_merged_worst.items()):
        cells = "".join(f"{d[k]:>12.2e}" if k in d else f"{'-':>12}" for k in ("float64", "float32"))
        tr.write_line(f"{family:<{width}}{cells}")
    tr.write_line(f"(written to {WORST_ERRORS_PATH})")



@pytest.fixture
def fake_cuda(monkeypatch):
    """The cupy stand-in (tests/fake_cupy.py) as tinytensor's cupy for one test: 'cuda' works
    without a GPU, with CuPy's rules on host/device mixing; its transfer counts start at 0."""
    import fake_cupy
    return fake_cupy.install(monkeypatch=monkeypatch)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small made-up text (test_train.make_text) in a file: the data of train.py's tests."""
    from test_train import make_text
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return str(path)
