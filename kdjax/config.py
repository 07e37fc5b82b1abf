"""Experiment config files: loading one ('path[:arg]') with one-line errors."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config_file(ref: str, what: str = "config file", root: str | None = None) -> ml_collections.ConfigDict:
    """`get_config([arg])` of the config file 'path[:arg]' (the arg is passed only when ':' is given).

    A relative path that does not exist from the current folder is looked up under `root` when
    given. Every failure is a one-line ValueError naming the file, `what` first: the file is
    missing, raises on import, defines no get_config, or get_config raises (its error's last line).
    The one loader of the entry points (experiments/launch.py) and of sweeps (kdjax.sweep)."""
    path, sep, arg = ref.partition(":")
    resolved = path
    if root is not None and not os.path.isabs(path) and not os.path.exists(path):
        candidate = os.path.join(root, path)
        resolved = candidate if os.path.exists(candidate) else path
    if not os.path.isfile(resolved):
        raise ValueError(f"{what} {path} not found")
    try:
        spec = importlib.util.spec_from_file_location("_kdjax_config_file", resolved)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - anything the user's config file raises
        raise _one_line(what, path, e) from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{what} {path} defines no get_config(arg=None) function")
    try:
        return module.get_config(*([arg] if sep else []))
    except Exception as e:  # noqa: BLE001
        raise _one_line(what, path, e) from None


def _one_line(what: str, path: str, error: BaseException) -> ValueError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return ValueError(f"{what} {path}: {type(error).__name__}" + (f": {lines[-1]}" if lines else ""))
