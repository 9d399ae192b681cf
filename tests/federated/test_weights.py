"""Flat weight arrays, FedAvg and safetensors files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from federated.templates import get_template
from federated.weights import (
    WeightsError,
    fedavg,
    load_safetensors,
    num_params,
    pack,
    read_safetensors_metadata,
    save_safetensors,
    unpack,
)


@pytest.mark.parametrize("name", ["logistic_regression", "mlp_classifier", "mlp_regressor"])
def test_pack_unpack_round_trip(name: str) -> None:
    tpl = get_template(name)
    src = tpl.build(30, seed=1)
    flat = pack(src)
    assert flat.dtype == np.float32 and flat.ndim == 1 and flat.shape[0] == num_params(src)
    dst = unpack(tpl.build(30, seed=2), flat)
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert k == k2
        assert torch.equal(a, b)
    # pack returns a copy: training the model afterwards does not change the array
    with torch.no_grad():
        next(src.parameters()).add_(1.0)
    assert np.array_equal(pack(dst), flat)


def test_mlp_layout_is_state_dict_order() -> None:
    model = get_template("mlp_classifier").build(4, seed=0)
    flat = pack(model)
    w0 = model[0].weight.detach().numpy().reshape(-1)
    assert np.array_equal(flat[: w0.size], w0)
    assert flat.size == 4 * 32 + 32 + 32 + 1


@pytest.mark.parametrize(("bad", "match"), [
    (np.zeros(3, dtype=np.float32), "expected 31 values"),
    (np.zeros((31, 1), dtype=np.float32), "1-D"),
    (np.full(31, np.nan, dtype=np.float32), "NaN"),
])
def test_unpack_refuses_bad_arrays_and_changes_nothing(bad: np.ndarray, match: str) -> None:
    model = get_template("logistic_regression").build(30)
    before = pack(model)
    with pytest.raises(WeightsError, match=match):
        unpack(model, bad)
    assert np.array_equal(pack(model), before)


def test_fedavg_is_the_weighted_mean() -> None:
    a = np.array([1.0, 2.0], dtype=np.float32)
    b = np.array([3.0, 6.0], dtype=np.float32)
    out = fedavg([a, b], [1, 3])
    assert out.dtype == np.float32
    assert np.allclose(out, [2.5, 5.0])
    assert np.allclose(fedavg([a, b], [0, 5]), b)


@pytest.mark.parametrize(("states", "weights", "match"), [
    ([], [], "nothing"),
    ([np.zeros(2)], [1, 2], "2 weights for 1"),
    ([np.zeros(2), np.zeros(3)], [1, 1], "shapes differ"),
    ([np.zeros(2)], [-1], "non-negative"),
    ([np.zeros(2)], [0], "sum to zero"),
])
def test_fedavg_refuses_bad_input(states: list, weights: list, match: str) -> None:
    with pytest.raises(WeightsError, match=match):
        fedavg(states, weights)


def test_safetensors_save_reports_sha256_and_loads_back(tmp_path: Path) -> None:
    tpl = get_template("mlp_classifier")
    model = tpl.build(30, seed=5)
    path = tmp_path / "model.safetensors"
    digest = save_safetensors(model, path, {"study_id": "s1", "template": tpl.name})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not (tmp_path / "model.safetensors.tmp").exists()
    assert set(load_file(str(path))) == set(model.state_dict())
    loaded = load_safetensors(tpl.build(30, seed=9), path)
    assert np.array_equal(pack(loaded), pack(model))
    # same weights -> same bytes -> same hash (the log can pin the model by its hash)
    meta = {"template": tpl.name, "study_id": "s1"}
    assert save_safetensors(model, tmp_path / "again.safetensors", meta) == digest
    assert read_safetensors_metadata(path) == {"study_id": "s1", "template": tpl.name}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
                          st.integers(0, 1000)), min_size=1, max_size=6))
def test_fedavg_stays_within_the_inputs(pairs: list[tuple[list[float], int]]) -> None:
    states = [np.array(s, dtype=np.float32) for s, _ in pairs]
    weights = [w for _, w in pairs]
    if sum(weights) == 0:
        with pytest.raises(WeightsError):
            fedavg(states, weights)
        return
    out = fedavg(states, weights)
    used = np.stack([s for s, w in zip(states, weights, strict=True) if w > 0])
    assert np.all(out >= used.min(0) - 1e-3) and np.all(out <= used.max(0) + 1e-3)
