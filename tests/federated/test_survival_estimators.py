"""The hospital's own survival estimators and public data reader, which replace scikit-survival in
the Flower process (federated.survival_estimators, federated.clinical_data._arff_columns), give
what scikit-survival gives: the same public datasets, Breslow's baseline survival and the
Kaplan-Meier censoring distribution, on the shipped data and on ties, all-censored and
never-censored sets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from federated import clinical_data
from federated.clinical_data import SURVIVAL_DATASETS, public_survival_reference
from federated.survival_estimators import CensoringDistribution, breslow_baseline_survival


def _sksurv_raw(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What `clinical_data._raw` returned when it loaded the data with `sksurv.datasets`."""
    import sksurv.datasets as sd

    specs = clinical_data.survival_feature_specs(dataset)
    if dataset == "flchain":
        frame, outcome = sd.load_flchain()
        cols = [frame["age"].to_numpy(float), (frame["sex"].astype(str) == "M").to_numpy(float),
                frame["kappa"].to_numpy(float), frame["lambda"].to_numpy(float),
                frame["creatinine"].fillna(1.0).to_numpy(float),
                (frame["mgus"].astype(str) == "yes").to_numpy(float)]
        time, event = outcome["futime"], outcome["death"]
    else:
        frame, outcome = sd.load_gbsg2()
        grade = frame["tgrade"].astype(str).map({"I": 1.0, "II": 2.0, "III": 3.0})
        cols = [frame["age"].to_numpy(float), (frame["menostat"].astype(str) == "Post").to_numpy(float),
                (frame["horTh"].astype(str) == "yes").to_numpy(float), frame["tsize"].to_numpy(float),
                grade.to_numpy(float), frame["pnodes"].to_numpy(float), frame["progrec"].to_numpy(float),
                frame["estrec"].to_numpy(float)]
        time, event = outcome["time"], outcome["cens"]
    x = np.column_stack([s.scale(c) for s, c in zip(specs, cols, strict=True)]).astype(np.float32)
    e = np.asarray(event, dtype=np.float64)
    strata = (np.digitize(cols[0], clinical_data._AGE_CUTS[dataset]) * 2 + e).astype(np.int64)
    return x, np.asarray(time, dtype=np.float64), e, strata


@pytest.mark.parametrize("dataset", SURVIVAL_DATASETS)
def test_public_datasets_read_without_scikit_survival_match_it(dataset: str) -> None:
    ours = clinical_data._raw(dataset)
    theirs = _sksurv_raw(dataset)
    for name, a, b in zip(("x", "time", "event", "strata"), ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert ours[0].shape[0] == {"flchain": 7874, "gbsg2": 686}[dataset]


def test_reading_the_public_reference_imports_no_scikit_survival_learn_or_pandas() -> None:
    code = ("import sys\n"
            "from federated.clinical_data import public_survival_reference\n"
            "from federated import eval_stats\n"
            "from federated.survival import baseline_survival\n"
            "cols = ('age', 'sex', 'kappa', 'lambda', 'creatinine', 'mgus')\n"
            "sub = public_survival_reference(cols, 'pretrain')\n"
            "eval_stats.survival_setup(cols)\n"
            "baseline_survival(sub.x.sum(1), sub)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sksurv', 'sklearn', 'pandas'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _sets() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    sets = []
    for dataset in SURVIVAL_DATASETS:
        sub = public_survival_reference([s.name for s in clinical_data.survival_feature_specs(dataset)],
                                        "pretrain")
        assert sub is not None
        sets.append((dataset, sub.x.astype(np.float64) @ rng.normal(size=sub.x.shape[1]) * 0.3,
                     sub.event.astype(bool), sub.time))
    n = 60  # heavy ties: 8 distinct times, events and censorings at the same times
    time = rng.integers(1, 9, size=n).astype(np.float64)
    sets.append(("ties", rng.normal(size=n), rng.random(n) < 0.5, time))
    sets.append(("never censored", rng.normal(size=n), np.ones(n, bool), time))
    sets.append(("censored last", rng.normal(size=3), np.array([True, True, False]),
                 np.array([1.0, 2.0, 3.0])))
    return sets


@pytest.mark.parametrize("case", _sets(), ids=lambda c: c[0])
def test_breslow_baseline_survival_matches_scikit_survival(case: tuple) -> None:
    from sksurv.linear_model.coxph import BreslowEstimator

    _name, eta, event, time = case
    times, s0 = breslow_baseline_survival(eta, event, time)
    fn = BreslowEstimator().fit(eta, event, time).baseline_survival_
    np.testing.assert_array_equal(times, fn.x)
    np.testing.assert_array_equal(s0, fn.y)
    assert np.all(np.diff(s0) <= 0) and 0 < s0[-1] <= s0[0] <= 1


@pytest.mark.parametrize("case", _sets(), ids=lambda c: c[0])
def test_censoring_distribution_matches_scikit_survival(case: tuple) -> None:
    from sksurv.nonparametric import CensoringDistributionEstimator
    from sksurv.util import Surv

    _name, _eta, event, time = case
    ours = CensoringDistribution.fit(event, time)
    theirs = CensoringDistributionEstimator().fit(Surv.from_arrays(event, time))
    np.testing.assert_array_equal(ours.times, theirs.unique_time_)
    np.testing.assert_array_equal(ours.probabilities, theirs.prob_)
    # at the observed times, between them, before the first and at the last
    at = np.unique(np.r_[time, (time[:-1] + time[1:]) / 2, time.min() - 1.0, time.max()])
    np.testing.assert_array_equal(ours.predict(at), theirs.predict_proba(at))
    if ours.probabilities[-1] > 0:
        with pytest.raises(ValueError, match="time: must not exceed the last observed time"):
            ours.predict(np.array([time.max() + 1.0]))
        with pytest.raises(ValueError):
            theirs.predict_proba(np.array([time.max() + 1.0]))


def test_bad_input_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="event, time: need two 1-d arrays"):
        CensoringDistribution.fit(np.array([True]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="time: must be finite"):
        breslow_baseline_survival(np.zeros(2), np.array([True, False]), np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="linear_predictor: need one per patient"):
        breslow_baseline_survival(np.zeros(3), np.array([True, False]), np.array([1.0, 2.0]))
