"""The shape of the library (GUIDE principles 16 and 17): the reference layer imports no
accelerator, each fused op dispatches once, and one module reads the environment."""
import ast
import os
import re

import pytest

import tinytensor.fused as fused
from tinytensor import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tinytensor")
# the engine, the primitive ops, nn and the optimizer: plain array code, no accelerator
REFERENCE = ["tensor.py", "optim.py"] + [os.path.join(d, f) for d in ("ops", "nn")
                                         for f in os.listdir(os.path.join(PACKAGE, d))
                                         if f.endswith(".py")]


def imported_names(path):
    """Every module a file imports, as an absolute dotted name (relative imports resolved)."""
    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    package = module.rsplit(".", 1)[0] if not module.endswith("__init__") else module[:-9]
    names = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            names += [f"{prefix}.{a.name}" for a in node.names] + [prefix]
    return names


@pytest.mark.parametrize("name", REFERENCE)
def test_the_reference_layer_imports_no_accelerator(name):
    for imported in imported_names(os.path.join(PACKAGE, name)):
        assert not re.match(r"tinytensor\.(kernels|parallel)(\.|$)", imported), \
            f"tinytensor/{name} imports {imported}: the accelerators live behind fused.py's dispatch"


def test_each_fused_op_dispatches_once():
    """fused.run is the one call of kernels.accelerated; each op with accelerated versions has
    one wrapper that calls run once."""
    source = open(fused.__file__, encoding="utf-8").read()
    assert len(re.findall(r"kernels\.accelerated\(\w", source)) == 1
    for name in kernels._FAMILIES:
        assert isinstance(getattr(fused, name), type), name
        calls = re.findall(rf"\brun\({name},", source)
        assert len(calls) == 1, f"fused.{name}: {len(calls)} dispatch calls, expected one"


def test_one_module_reads_the_environment():
    readers = []
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                if re.search(r"os\.environ|os\.getenv|getenv\(", text):
                    readers.append(os.path.relpath(os.path.join(folder, f), PACKAGE))
    assert readers == ["environment.py"], readers
