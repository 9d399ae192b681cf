"""A model's parameters as ONE flat float32 array, FedAvg over such arrays, and safetensors files.

Why one array: Flower 1.42 moves every array of a message as its own object over HTTP, and
each extra array costs an extra round trip per hop (measurements in docs/flower.md).
The layout is the order of `model.state_dict()`; both ends build the model from the same
template and feature count, so the layout is agreed without sending it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: fedavg and the flat arrays need no torch (the server's
    # aggregation), and a hospital's model is NumPy's (`federated.numpy_mlp`)
    from torch import nn

METADATA_KEY = "exchange"


class WeightsError(ValueError):
    """A flat weight array does not fit the model, or an aggregation input is invalid."""


def num_params(model: nn.Module) -> int:
    """Length of the flat array for `model`."""
    return sum(int(t.numel()) for t in model.state_dict().values())


def pack(model: nn.Module) -> np.ndarray:
    """All of `model`'s state (parameters, then nothing else: templates have no buffers) as one
    contiguous float32 vector, in `state_dict()` order. A copy: later training does not alter it."""
    import torch

    tensors = [t.detach().reshape(-1).to(torch.float32) for t in model.state_dict().values()]
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(tensors).numpy().copy()


def unpack(model: nn.Module, flat: np.ndarray) -> nn.Module:
    """Load `flat` (from `pack` of a model of the same shape) into `model` in place; returns it.

    Refuses (and changes nothing) when the array is not 1-D, has the wrong length or holds
    non-finite values: a NaN from a broken peer must not silently poison a model.
    """
    arr = np.asarray(flat)
    if arr.ndim != 1:
        raise WeightsError(f"weights: expected a 1-D array, got shape {arr.shape}")
    expected = num_params(model)
    if arr.shape[0] != expected:
        raise WeightsError(f"weights: expected {expected} values for this model, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise WeightsError("weights: array holds NaN or infinite values")
    import torch

    src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    state = model.state_dict()
    offset = 0
    new_state: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        n = int(t.numel())
        new_state[name] = src[offset:offset + n].reshape(t.shape).to(t.dtype)
        offset += n
    model.load_state_dict(new_state)
    return model


def fedavg(states: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted average of flat arrays (FedAvg; weights are usually examples trained on).

    Computed in float64 then returned as float32. Zero-weight entries are ignored; all zero, an
    empty input, unequal lengths or a negative weight are errors.
    """
    if len(states) == 0:
        raise WeightsError("states: nothing to aggregate")
    if len(states) != len(weights):
        raise WeightsError(f"weights: {len(weights)} weights for {len(states)} states")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise WeightsError("weights: must be finite and non-negative")
    if w.sum() <= 0:
        raise WeightsError("weights: sum to zero")
    length = np.asarray(states[0]).shape
    acc = np.zeros(length, dtype=np.float64)
    for s, wi in zip(states, w, strict=True):
        arr = np.asarray(s, dtype=np.float64)
        if arr.shape != length:
            raise WeightsError(f"states: shapes differ ({arr.shape} vs {length})")
        if wi > 0:
            acc += wi * arr
    return (acc / w.sum()).astype(np.float32)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_safetensors(model: nn.Module, path: str | Path,
                     metadata: dict[str, str] | None = None) -> str:
    """Write `model`'s state as a safetensors file (no pickle: safe to load anywhere) and return
    the file's hex SHA-256, which is what the audit log records for the final model.

    The file is written to a temporary name, fsynced and renamed, so a crash never leaves a
    half-written model under the final name.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    # safetensors writes its metadata map in hash-map order, which varies between processes: with
    # two or more keys the same model would get different bytes (and hashes). One key holding
    # canonical JSON keeps the file, and so its hash, a function of the model and metadata alone.
    header = {METADATA_KEY: json.dumps(dict(metadata or {}), sort_keys=True, separators=(",", ":"))}
    save_file(state, str(tmp), metadata=header)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return sha256_file(path)


def load_safetensors(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a file written by `save_safetensors` into `model` (shapes must match)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata dict given to `save_safetensors` for the file at `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY, "{}")
    return dict(json.loads(raw))
