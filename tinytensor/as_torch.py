"""Run a script written for torch on tinytensor:

    python -m tinytensor.as_torch gpt.py [its arguments]

The script runs as `python gpt.py` would run it (as __main__, with its own sys.argv and its
folder on sys.path), with `import torch` resolved to tinytensor. The aliases are module names
only (ALIASES below: torch -> tinytensor, torch.nn -> tinytensor.nn, and so on): every name
the script reaches is tinytensor's own, and what tinytensor does not have fails as an
AttributeError that names it.

In Python, `with as_torch.aliases(): import my_torch_module` gives the same for one import.
"""
import contextlib
import importlib
import os
import runpy
import sys

ALIASES = {
    "torch": "tinytensor",
    "torch.nn": "tinytensor.nn",
    "torch.nn.functional": "tinytensor.nn.functional",
    "torch.nn.init": "tinytensor.nn.init",
    "torch.nn.utils": "tinytensor.nn.utils",
    "torch.optim": "tinytensor.optim",
    "torch.cuda": "tinytensor.cuda",
}

USAGE = "usage: python -m tinytensor.as_torch SCRIPT.py [ARGS...]  (runs a torch script on tinytensor)"


def install():
    """Point the torch module names at tinytensor's modules in sys.modules; returns what
    those names held before (for restore)."""
    targets = {name: importlib.import_module(target) for name, target in ALIASES.items()}
    before = {name: sys.modules.get(name) for name in ALIASES}
    sys.modules.update(targets)
    return before


def restore(before):
    """Undo install(): each torch name holds what it held before (or nothing)."""
    for name, module in before.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


@contextlib.contextmanager
def aliases():
    """`import torch` inside the block gives tinytensor; afterwards the names are as before
    (modules imported inside keep the tinytensor they bound)."""
    before = install()
    try:
        yield
    finally:
        restore(before)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    script = argv[0]
    if not os.path.isfile(script):
        print(f"error: no script {script!r}: {USAGE}", file=sys.stderr)
        return 2
    install()
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
