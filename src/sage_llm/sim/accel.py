"""Opt-in accelerator: the cluster simulator's hot modules compiled with mypyc.

The simulator is pure Python by default, and that is what the tests, the demo and the
benchmarks run unless the accelerator is built. ``make sim-accel`` (or
``python -m sage_llm.sim.accel build``) compiles :data:`MODULES` with mypyc, which is part
of mypy (the ``dev`` extra), and a C compiler: each module gets an extension module next to
its ``.py`` (``core.cpython-311-x86_64-linux-gnu.so``), which the import system then loads
instead of the source, plus one shared library for the group
(``sage_llm/sim/_accel__mypyc….so``) and a manifest of the compiled sources' hashes
(``sage_llm/sim/_accel.json``); all are git-ignored. ``make sim-accel-clean`` (``… clean``)
removes them. The compiled code is the same code: every result is identical, only faster.

``python -m sage_llm.sim.accel status`` (or :func:`status`) says which modules are
loaded compiled and whether any was edited after it was built (a stale build: the
extension, not the edited source, is what Python imports; rebuild or clean).

Only modules that mypyc compiles unchanged in meaning are listed: no ``runtime_checkable``
protocols, no nested classes, no class subclassed by interpreted code (the scheduling
policies stay interpreted for these reasons, though the lane heaps under their queue,
``scheduling._lanes``, are compiled; ``sage_llm.tokens`` stays interpreted because callers
pass it other number types than its annotations say: the engine core hashes prompts with
a copy of its block hash, :func:`sage_llm.sim.core.prompt_block_hashes`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

__all__ = ["MODULES", "build", "clean", "compiled_modules", "main", "status"]

MODULES = (
    "sage_llm.sim.core",
    "sage_llm.sim.roofline_step",
    "sage_llm.sim.cluster",
    "sage_llm.sim.cluster_control",
    "sage_llm.sim.cluster_state",
    "sage_llm.sim.cluster_fleet",
    "sage_llm.sim.cluster_results",
    "sage_llm.control_plane.routing.filters",
    "sage_llm.control_plane.routing.pickers",
    "sage_llm.control_plane.routing.pipeline",
    "sage_llm.control_plane.routing.scorers",
    "sage_llm.control_plane.routing.strategies",
    "sage_llm.control_plane.scheduling._lanes",
)
"""The modules the accelerator compiles (one mypyc group)."""

_GROUP = "sage_llm.sim._accel"
"""The group's shared library: ``sage_llm/sim/_accel__mypyc.<ext suffix>``."""
_MANIFEST = "_accel.json"

_SETUP = """\
import sys
from setuptools import setup
from mypyc.build import mypycify

paths, group, tmp = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
setup(
    name="sage-llm-sim-accel",
    ext_modules=mypycify(paths, group_name=group, target_dir=tmp + "/c"),
    script_args=["build_ext", "--inplace", "--quiet", "--build-temp", tmp + "/temp",
                 "--build-lib", tmp + "/lib"],
)
"""


def _src_root() -> Path:
    """The directory that holds the ``sage_llm`` package (``src/`` in a checkout)."""
    return Path(__file__).resolve().parents[2]


def _source(module: str) -> Path:
    return _src_root().joinpath(*module.split(".")).with_suffix(".py")


def _ext_suffix() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _extension(module: str) -> Path:
    return _source(module).with_suffix(_ext_suffix())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_path() -> Path:
    return _src_root() / "sage_llm" / "sim" / _MANIFEST


def _built_files() -> list[Path]:
    sim = _src_root() / "sage_llm" / "sim"
    files = [_extension(m) for m in MODULES]
    files += sim.glob("_accel__mypyc*")
    files.append(_manifest_path())
    return [f for f in files if f.exists()]


def compiled_modules() -> list[str]:
    """The modules of :data:`MODULES` that Python loads compiled (imports them)."""
    out: list[str] = []
    for name in MODULES:
        mod = importlib.import_module(name)
        if not str(getattr(mod, "__file__", "")).endswith(".py"):
            out.append(name)
    return out


def status() -> dict[str, list[str]]:
    """Which modules are compiled, and which of them were edited after the build."""
    compiled = compiled_modules()
    stale: list[str] = []
    if compiled:
        try:
            built = json.loads(_manifest_path().read_text())
        except (OSError, ValueError):
            built = {}
        stale = [m for m in compiled if built.get(m) != _digest(_source(m))]
    return {"compiled": compiled, "stale": stale}


def _fail(message: str) -> int:
    print(f"sim-accel: {message}", file=sys.stderr)
    return 1


def build(*, verbose: bool = False) -> int:
    """Compile :data:`MODULES` in place; 0 on success, else 1 with a one-line reason."""
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return _fail("mypyc is not installed (it comes with mypy: pip install -e '.[dev]')")
    cc = os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return _fail(f"no C compiler ({cc!r} not found); the simulator stays pure Python")
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.exists():
        return _fail(f"no Python headers ({include} not found); install python3-dev")
    clean()
    root = _src_root()
    paths = [str(_source(m).relative_to(root)) for m in MODULES]
    with tempfile.TemporaryDirectory(prefix="sage-llm-accel-") as tmp:
        setup_py = Path(tmp) / "setup_accel.py"
        setup_py.write_text(_SETUP)
        cmd = [
            sys.executable,
            str(setup_py),
            ",".join(paths),
            _GROUP,
            tmp,
        ]
        done = subprocess.run(cmd, cwd=root, capture_output=not verbose, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-12:]
        print("\n".join(tail), file=sys.stderr)
        clean()
        return _fail(f"mypyc build failed (exit {done.returncode}); nothing is left compiled")
    _manifest_path().write_text(
        json.dumps({m: _digest(_source(m)) for m in MODULES}, indent=1) + "\n"
    )
    print(f"sim-accel: compiled {len(MODULES)} modules ({', '.join(MODULES)})")
    return 0


def clean() -> int:
    """Remove the compiled modules (the pure-Python sources are then loaded again)."""
    for path in _built_files():
        path.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "status"
    if any(arg in ("-h", "--help") for arg in args):  # (clean --help had cleaned)
        print(
            "usage: python -m sage_llm.sim.accel [build [-v] | clean | status]: compile the "
            "simulator's hot modules with mypyc, remove them, or say whether they are "
            "built and current (the default)"
        )
        return 0
    if command == "build":
        return build(verbose="-v" in args[1:])
    if command == "clean":
        clean()
        print("sim-accel: removed; the simulator is pure Python")
        return 0
    if command == "status":
        state = status()
        print(json.dumps(state))
        return 1 if state["stale"] else 0
    return _fail(f"unknown command {command!r}; expected build, clean or status")


if __name__ == "__main__":
    raise SystemExit(main())
