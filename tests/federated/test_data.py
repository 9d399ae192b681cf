"""Demo data: non-IID split, pseudonyms, categories, public scaling."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from federated.data import (
    DataError,
    column_categories,
    demo_secret,
    feature_specs,
    load_federated,
    load_hospital,
    pooled,
    pseudonym,
    public_reference_rows,
    reference_constants,
)


def test_breast_cancer_split_covers_every_private_record_once() -> None:
    parts = load_federated("breast_cancer", scaling="bounds")
    assert [p.hospital_id for p in parts] == ["hospital-a", "hospital-b", "hospital-c"]
    public = public_reference_rows("breast_cancer")
    assert len(public) == 57
    assert sum(len(p) for p in parts) + len(public) == 569
    assert sorted(len(p) for p in parts) == [170, 171, 171]  # equal sizes
    # every source row is either public or held by exactly one hospital
    source = np.column_stack([s.scale(c) for s, c in zip(
        feature_specs("breast_cancer"), load_breast_cancer().data.T, strict=True)]).astype(np.float32)
    held = sorted(row.tobytes() for p in parts for row in p.x)
    expected = sorted(source[i].tobytes() for i in np.setdiff1d(np.arange(569), public))
    assert held == expected
    malignant_public = int((load_breast_cancer().target[public] == 0).sum())
    assert int(sum(p.y.sum() for p in parts)) == 212 - malignant_public


def test_split_is_non_iid_by_label() -> None:
    shares = [float(p.y.mean()) for p in load_federated("breast_cancer")]
    assert max(shares) - min(shares) > 0.3
    assert all(0 < s < 1 for s in shares)  # every hospital still has both classes


def test_split_is_deterministic_and_seed_dependent() -> None:
    a = load_federated("breast_cancer")
    b = load_federated("breast_cancer")
    c = load_federated("breast_cancer", split_seed=5)
    assert [p.pseudonyms for p in a] == [p.pseudonyms for p in b]
    assert [set(p.pseudonyms) for p in a] != [set(p.pseudonyms) for p in c]


def test_load_hospital_is_that_hospitals_part() -> None:
    part = load_hospital("breast_cancer", "hospital-b")
    assert part.pseudonyms == load_federated("breast_cancer")[1].pseudonyms
    with pytest.raises(DataError, match="hospital_id"):
        load_hospital("breast_cancer", "hospital-z")


def test_pseudonyms_are_hospital_scoped_hmacs() -> None:
    parts = load_federated("breast_cancer")
    for p in parts:
        assert len(set(p.pseudonyms)) == len(p)
        assert all(re.fullmatch(r"p_[0-9a-f]{32}", s) for s in p.pseudonyms)
    assert not set(parts[0].pseudonyms) & set(parts[1].pseudonyms)
    # the same source row gets unrelated pseudonyms at two hospitals
    assert pseudonym(demo_secret("hospital-a"), "breast_cancer", 0) != pseudonym(
        demo_secret("hospital-b"), "breast_cancer", 0)
    # a hospital's own secret changes all its pseudonyms
    other = load_federated("breast_cancer", secrets={"hospital-a": b"k" * 32})
    assert not set(other[0].pseudonyms) & set(parts[0].pseudonyms)
    assert other[1].pseudonyms == parts[1].pseudonyms


def test_features_are_scaled_with_public_constants_only() -> None:
    for name in ("breast_cancer", "diabetes"):
        x = pooled(load_federated(name, scaling="bounds")).x
        assert x.dtype == np.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        ref = pooled(load_federated(name)).x
        assert ref.min() >= -3.0 and ref.max() <= 3.0
        # reference centring makes the (private) features roughly centred too
        assert np.abs(ref.mean(0)).max() < 0.5
        assert np.abs(x.mean(0)).mean() > np.abs(ref.mean(0)).mean()
    # the constants come from the public rows only: they equal a computation over those rows
    centre, scale = reference_constants("breast_cancer")
    bounds = np.column_stack([s.scale(c) for s, c in zip(
        feature_specs("breast_cancer"), load_breast_cancer().data.T, strict=True)])
    public = bounds[public_reference_rows("breast_cancer")]
    np.testing.assert_allclose(centre, public.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale, public.std(0), rtol=1e-5, atol=1e-6)


def test_categories() -> None:
    cats = column_categories("breast_cancer")
    assert len(cats) == 30
    assert sum(c == "labs" for c in cats.values()) == 10
    assert sum(c == "imaging" for c in cats.values()) == 20
    assert cats["mean radius"] == "labs" and cats["worst area"] == "imaging"
    diab = column_categories("diabetes")
    assert diab["age"] == "demographics" and diab["bmi"] == "vitals" and diab["s1"] == "labs"


def test_select_categories_and_columns() -> None:
    part = load_hospital("breast_cancer", "hospital-a")
    labs = part.select_categories(["labs"])
    assert labs.n_features == 10
    assert all(c.startswith("mean ") for c in labs.columns)
    assert np.array_equal(labs.x, part.x[:, :10])
    cols = part.select_columns(["worst area", "mean radius"])
    assert np.array_equal(cols.x[:, 1], part.x[:, 0])
    with pytest.raises(DataError, match="categories: unknown data categories \\['genomics'\\]"):
        part.select_categories(["genomics"])
    with pytest.raises(DataError, match="columns: unknown columns"):
        part.select_columns(["height"])
    with pytest.raises(DataError, match="columns: at least one"):
        part.select_columns([])


def test_select_records_keeps_only_the_given_pseudonyms() -> None:
    part = load_hospital("breast_cancer", "hospital-c")
    chosen = set(part.pseudonyms[::3])
    sub = part.select_records(chosen)
    assert set(sub.pseudonyms) == chosen
    idx = [part.pseudonyms.index(p) for p in sub.pseudonyms]
    assert np.array_equal(sub.x, part.x[idx]) and np.array_equal(sub.y, part.y[idx])
    assert len(part.select_records([])) == 0
    with pytest.raises(DataError, match="pseudonyms: 1 not held"):
        part.select_records(["p_" + "0" * 32])


def test_train_test_split_per_hospital() -> None:
    for part in load_federated("breast_cancer"):
        train, test = part.train(), part.test()
        assert len(train) + len(test) == len(part)
        assert 0.15 < len(test) / len(part) < 0.25
        assert not set(train.pseudonyms) & set(test.pseudonyms)


def test_diabetes_regression_split() -> None:
    parts = load_federated("diabetes")
    assert sum(len(p) for p in parts) + len(public_reference_rows("diabetes")) == 442
    assert all(p.task == "regression" and p.target_scale == 75.0 for p in parts)
    raw = pooled(parts).y * 75.0 + 150.0
    assert 25.0 <= raw.min() < 40.0 and 320.0 < raw.max() <= 346.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dataset": "mnist"}, "dataset"),
    ({"alpha": 0.0}, "alpha"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"hospital_ids": ["a", "a", "b"]}, "hospital_ids"),
    ({"min_records": 200}, "min_records"),
    ({"scaling": "zscore"}, "scaling"),
])
def test_bad_split_requests_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_federated(**({"dataset": "breast_cancer"} | kwargs))
