"""What every `drone-hf` command does around its work: the OpenMP wait policy before torch starts, the library
import (deferred in the command, see `drone_hf/__init__.py`), `--threads`, progress lines on stderr, and one-line
errors (a missing extra named, notes such as offline hints kept). Imports only the standard library at module level:
the command builds its parser before torch and transformers are imported."""

from __future__ import annotations

import contextlib
import logging
import os
import sys


def set_openmp_wait_policy() -> None:
    """`OMP_WAIT_POLICY=PASSIVE` unless set, when torch is not imported yet.

    libgomp (torch's OpenMP on Linux) spin-waits between parallel regions by default: with more threads than free
    cores (a shared machine) every run slows down and its timings mean little. The runtime reads the policy once,
    when torch loads it, so this only works before `import torch`; an explicit value wins.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Optional dependencies -> the extra of pyproject.toml that brings them.
_EXTRAS = {
    "datasets": "glue",
    "pandas": "glue",
    "sklearn": "glue",
    "scipy": "glue",
    "sentence_transformers": "sentence-transformers",
    "onnx": "onnx",
    "onnxruntime": "onnx",
}


def require_extra(extra: str) -> None:
    """Raises `ModuleNotFoundError` (printed as one line naming `extra`) if a module of `extra` is not installed."""
    import importlib.util

    for module, needed_by in _EXTRAS.items():
        if needed_by != extra:
            continue
        try:
            missing = importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # a broken or blocked (None in sys.modules) module
            missing = True
        if missing:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def error_text(error: BaseException) -> str:
    """The one line (plus any notes, such as the offline hints of `drone_hf.glue`) printed for a failed command."""
    if isinstance(error, ImportError):
        missing = (error.name or "").split(".")[0]
        if missing in _EXTRAS:
            extra = _EXTRAS[missing]
            return (
                f"`{missing}` is not installed; it comes with the `{extra}` extra: pip install -e '.[{extra}]' in "
                "your drone_hf clone."
            )
    return "\n".join([str(error), *getattr(error, "__notes__", ())])


def start_command(args) -> None:
    """Imports the library (registration included: deferred in the command, see drone_hf/__init__.py), applies
    `--threads` and checks `--method`, before any model is loaded."""
    import drone_hf

    drone_hf._load_library()
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"`--threads` must be at least 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    if hasattr(args, "method"):  # before any model loads (the registry may hold methods added by a plugin)
        from .methods import method_names, resolve_method

        if args.method not in method_names():
            raise ValueError(
                f"`--method` {args.method!r} is not a factorisation method; choose one of {method_names()}."
            )
        resolve_method(args.method, getattr(args, "bias_correction", None))


@contextlib.contextmanager
def progress_lines():
    """drone_hf's log lines on stderr while a command runs (level INFO, or `TRANSFORMERS_VERBOSITY`), then the
    logger as it was (the command also runs inside other programs, e.g. tests)."""
    root = logging.getLogger("drone_hf")
    saved = root.level, root.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("drone-hf: %(message)s"))
    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY", "info").lower()
    root.setLevel(verbosity.upper() if verbosity in ("debug", "info", "warning", "error", "critical") else "INFO")
    root.addHandler(handler)
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


__all__ = ["error_text", "progress_lines", "require_extra", "set_openmp_wait_policy", "start_command"]
