"""Atomic, pickle-free training checkpoints for resume after a kill.

A checkpoint is a folder ``NAME/`` with ``tensors.safetensors`` (model,
optimizer and RNG tensors, flattened) and ``state.json`` (everything else:
epoch, step, scheduler state, numpy RNG state, param groups). It is written
to a temporary folder and renamed, so a kill leaves either the old or the new
checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_T = "tensors.safetensors"
_J = "state.json"


def _flatten(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by ``{"__tensor__": key}`` references."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [[k, _flatten(f"{prefix}.{k}", v, tensors)] for k, v in obj.items()]
        }
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) atomically.

    Through :func:`pcl_viewer.atomic.atomic_dir`: a temporary sibling folder, every file
    fsync'ed, then renamed over ``path`` (a kill leaves the old or the new checkpoint).
    """
    from pcl_viewer.atomic import atomic_dir

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten("s", state, tensors)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / _T))
        (tmp / _J).write_text(json.dumps(skeleton))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """Read a checkpoint written by :func:`save_checkpoint`; None if there is none.

    If a kill happened between the two renames, the ``.old`` copy is used.
    """
    path = Path(path)
    if not (path / _J).is_file():
        old = path.with_name(f".{path.name}.old")
        if (old / _J).is_file():
            path = old
        else:
            return None
    tensors = load_file(str(path / _T))
    return _unflatten(json.loads((path / _J).read_text()), tensors)


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint written by :func:`save_checkpoint`, and the ``.old`` copy a
    kill between the two renames can leave; nothing else beside it is touched."""
    import shutil

    path = Path(path)
    for p in (path, path.with_name(f".{path.name}.old")):
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """torch CPU RNG state (numpy generators are passed explicitly and saved by callers)."""
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
