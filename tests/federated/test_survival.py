"""Cox template (case-cohort with a public subcohort), multi-class template, clinical data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from federated.accounting import plan_study
from federated.clinical_data import (
    EVENT_COLUMN,
    TIME_COLUMN,
    age_band_dataset,
    load_survival_federated,
    public_rows,
    public_survival_reference,
    split_outcome,
)
from federated.data import DataError, pooled
from federated.dp import (
    DPTrainingError,
    cox_clipped_sum,
    fit_cox_nonprivate,
    initial_state,
    public_initial_state,
    train_nonprivate,
)
from federated.dp_round import train_round
from federated.evaluation import aggregate, noised_release, patient_scores
from federated.secure_random import SecureRandom
from federated.survival import (
    Subcohort,
    SurvivalError,
    anchored_concordance,
    check_outcome,
    exact_metrics,
    per_patient_grads,
    per_patient_loss,
)
from federated.templates import TemplateError, get_template
from federated.weights import unpack


@pytest.fixture(scope="module")
def flchain() -> dict[str, object]:
    parts = load_survival_federated("flchain", 3)
    columns = [c for c in parts[0].columns if c != EVENT_COLUMN]
    return {"parts": parts, "columns": columns,
            "sub": public_survival_reference(columns, "pretrain"),
            "train": split_outcome(pooled(parts).train(), columns),
            "test": split_outcome(pooled(parts).test(), columns)}


# -- data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["flchain", "gbsg2"])
def test_split_is_non_iid_disjoint_from_public_and_deterministic(dataset: str) -> None:
    parts = load_survival_federated(dataset, 3)
    again = load_survival_federated(dataset, 3)
    assert [p.pseudonyms for p in parts] == [p.pseudonyms for p in again]
    n_rows = len(public_rows(dataset)) + sum(len(p) for p in parts)
    assert n_rows == {"flchain": 7874, "gbsg2": 686}[dataset]
    for p in parts:
        assert p.task == "survival" and p.columns[-1] == EVENT_COLUMN
        assert np.all(p.y >= 0) and set(np.unique(p.x[:, -1])) <= {0.0, 1.0}
        assert 0.15 < p.is_test.mean() < 0.25
    rates = [float(p.x[:, -1].mean()) for p in parts]
    assert max(rates) - min(rates) > 0.04  # case mix differs between hospitals


def test_unknown_survival_dataset_is_named() -> None:
    with pytest.raises(DataError, match="dataset: unknown survival dataset 'whas'"):
        load_survival_federated("whas")


def test_public_reference_halves_are_disjoint_and_match_columns(flchain: dict) -> None:
    cols = ["kappa", "age"]
    pre, ev, everything = (public_survival_reference(cols, part) for part in ("pretrain", "eval", "all"))
    assert pre is not None and ev is not None and everything is not None
    assert len(pre) + len(ev) == len(everything) == len(public_rows("flchain"))
    assert pre.x.shape[1] == 2
    assert public_survival_reference(["no_such_column"]) is None


# -- the case-cohort loss and its gradients ----------------------------------------------------

def _batch(flchain: dict, n: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    train = flchain["train"]
    return (torch.from_numpy(train.x[:n]).double(), torch.from_numpy(train.time[:n]),
            torch.from_numpy(train.event[:n]))


def test_closed_form_gradients_match_autograd(flchain: dict) -> None:
    sub = Subcohort.from_set(flchain["sub"])
    sub = Subcohort(sub.x.double(), sub.time)
    x, t, e = _batch(flchain)
    beta = torch.linspace(-0.5, 0.8, x.shape[1], dtype=torch.float64)
    closed = per_patient_grads(beta, sub, x, t, e)
    for i in range(0, x.shape[0], 7):
        b = beta.clone().requires_grad_(True)
        per_patient_loss(b, sub, x[i:i + 1], t[i:i + 1], e[i:i + 1]).sum().backward()
        assert b.grad is not None
        torch.testing.assert_close(closed[i], b.grad)
    assert torch.all(closed[e == 0] == 0)  # censored patients have no gradient


def test_fast_and_opacus_engines_clip_the_same_sum(flchain: dict) -> None:
    model = get_template("cox_ph").build(len(flchain["columns"]))
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(-0.3, 0.6, len(flchain["columns"])))
    sub = Subcohort.from_set(flchain["sub"])
    train = flchain["train"]
    x = torch.from_numpy(train.x[:64])
    y = torch.from_numpy(np.column_stack([train.time[:64], train.event[:64]]))
    fast, norms = cox_clipped_sum(model, sub, x, y, clip=0.3, engine="fast")
    opacus, _ = cox_clipped_sum(model, sub, x, y, clip=0.3, engine="opacus")
    torch.testing.assert_close(fast, opacus, atol=1e-5, rtol=1e-4)
    assert float(norms.max()) > 0.3  # clipping was active


def test_one_patient_moves_the_clipped_sum_by_at_most_the_clip(flchain: dict) -> None:
    """The property the accounting rests on: adding any patient changes a step's clipped sum by
    at most C, because no patient's term depends on another private patient."""
    model = get_template("cox_ph").build(len(flchain["columns"]))
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(-0.3, 0.6, len(flchain["columns"])))
    sub = Subcohort.from_set(flchain["sub"])
    train = flchain["train"]
    x = torch.from_numpy(train.x[:80])
    y = torch.from_numpy(np.column_stack([train.time[:80], train.event[:80]]))
    base, _ = cox_clipped_sum(model, sub, x[:-1], y[:-1], clip=0.2)
    for k in range(60, 80):
        xs, ys = torch.cat([x[:-1], x[k:k + 1]]), torch.cat([y[:-1], y[k:k + 1]])
        added, _ = cox_clipped_sum(model, sub, xs, ys, clip=0.2)
        assert float((added - base).norm()) <= 0.2 + 1e-5


def test_risk_sets_within_the_batch_would_break_that_bound(flchain: dict) -> None:
    """Why the private batch is not used as the risk set (docs/survival.md): there, adding one
    patient who outlives many sampled events shifts all of their clipped terms."""
    train = flchain["train"]
    order = np.argsort(train.time)
    x = torch.from_numpy(train.x[order[:60]]).double()
    t = torch.from_numpy(train.time[order[:60]])
    e = torch.ones(60, dtype=torch.float64)
    beta = torch.zeros(x.shape[1], dtype=torch.float64)
    clip = 0.2

    def batch_risk_sum(xb: torch.Tensor, tb: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        grads = torch.stack([per_patient_grads(beta, Subcohort(xb[tb >= tb[i]], tb[tb >= tb[i]]),
                                               xb[i:i + 1], tb[i:i + 1], eb[i:i + 1])[0]
                             for i in range(len(tb))])
        norms = grads.norm(dim=1)
        return (grads * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0)

    far = int(np.argmax(np.abs(train.x).sum(1) * (train.time > train.time[order[60]])))
    xk = torch.from_numpy(train.x[far:far + 1]).double() * 0 + 3.0  # an extreme, long-lived patient
    tk = torch.tensor([train.time.max()])
    ek = torch.zeros(1, dtype=torch.float64)
    added = batch_risk_sum(torch.cat([x, xk]), torch.cat([t, tk]), torch.cat([e, ek]))
    change = added - batch_risk_sum(x, t, e)
    assert float(change.norm()) > 5 * clip


def test_nonprivate_fit_matches_lifelines(flchain: dict) -> None:
    from lifelines import CoxPHFitter

    train = flchain["train"]
    beta = fit_cox_nonprivate(np.zeros(train.x.shape[1], np.float32), train.x, train.time, train.event,
                              steps=500, l2=0.0)
    frame = pd.DataFrame(train.x.astype(np.float64), columns=flchain["columns"])
    frame["T"], frame["E"] = train.time, train.event
    ref = CoxPHFitter().fit(frame, "T", "E").params_.values
    np.testing.assert_allclose(beta, ref, atol=0.02)


def test_dp_training_learns_and_reports_patient_level_epsilon(flchain: dict) -> None:
    part = flchain["parts"][0]
    cols = flchain["columns"]
    data = split_outcome(part.train(), cols)
    plan = plan_study(3.0, 1e-5, rounds=1, n_patients=len(data), batch_size=256, steps_per_round=30,
                      evaluation=False)
    result = train_round("cox_ph", initial_state("cox_ph", len(cols)), data.x,
                         np.column_stack([data.time, data.event]), noise_multiplier=plan.noise_multiplier,
                         sample_rate=plan.sample_rate, local_steps=30, clip=1.0, lr=0.5, delta=1e-5,
                         seed=1, subcohort=flchain["sub"], patients=part.train().pseudonyms)
    assert result.trained and result.epsilon == pytest.approx(3.0, rel=0.05)
    test = flchain["test"]
    c = exact_metrics(test.x @ result.state, test, flchain["sub"].x @ result.state, flchain["sub"])
    assert c["concordance"] > 0.75 and 0.0 < c["ibs"] < 0.25


@pytest.mark.parametrize(("time", "event", "match"), [
    ([1.0, -2.0], [1, 0], "time: 1 negative"),
    ([1.0, np.nan], [1, 0], "time: holds NaN"),
    ([1.0, 2.0], [1, 2], "event: must be 0"),
])
def test_bad_outcomes_are_refused_with_the_field(time: list[float], event: list[float], match: str) -> None:
    with pytest.raises(SurvivalError, match=match):
        check_outcome(np.array(time), np.array(event))
    with pytest.raises(DPTrainingError, match=match):
        train_round("cox_ph", np.zeros(1, np.float32), np.zeros((2, 1)), np.column_stack([time, event]),
                    noise_multiplier=1.0, sample_rate=1.0, local_steps=1, clip=1.0, lr=0.1, delta=1e-5,
                    subcohort=public_survival_reference(["age"]))


def test_survival_needs_a_subcohort_and_two_outcome_columns() -> None:
    with pytest.raises(DPTrainingError, match="subcohort"):
        train_round("cox_ph", np.zeros(1, np.float32), np.zeros((2, 1)), np.zeros((2, 2)),
                    noise_multiplier=1.0, sample_rate=1.0, local_steps=1, clip=1.0, lr=0.1, delta=1e-5)
    with pytest.raises(DPTrainingError, match=r"y: a survival template needs \[records, 2\]"):
        train_round("cox_ph", np.zeros(1, np.float32), np.zeros((2, 1)), np.zeros(2),
                    noise_multiplier=1.0, sample_rate=1.0, local_steps=1, clip=1.0, lr=0.1, delta=1e-5,
                    subcohort=public_survival_reference(["age"]))


# -- metrics ----------------------------------------------------------------------------------------

def test_anchored_concordance_tracks_harrell(flchain: dict) -> None:
    beta = public_initial_state("cox_ph", flchain["columns"], "survival")
    test, ref = flchain["test"], public_survival_reference(flchain["columns"], "eval")
    assert ref is not None
    scores = anchored_concordance(test.x @ beta, test.time, test.event, ref.x @ beta, ref)
    assert scores.shape == (len(test),) and np.all((scores >= 0) & (scores <= 1))
    harrell = exact_metrics(test.x @ beta, test, flchain["sub"].x @ beta, flchain["sub"])["concordance"]
    assert abs(float(scores.mean()) - harrell) < 0.05
    reverse = anchored_concordance(-(test.x @ beta), test.time, test.event, -(ref.x @ beta), ref)
    assert float(reverse.mean()) < 0.3


def test_survival_release_goes_through_the_noised_sum_path(flchain: dict) -> None:
    tpl = get_template("cox_ph")
    cols = flchain["columns"]
    model = unpack(tpl.build(len(cols)), public_initial_state(tpl, cols, "survival"))
    part = flchain["parts"][1].test()
    y = np.column_stack([part.y, part.select_columns([EVENT_COLUMN]).x[:, 0]])
    scores = patient_scores(tpl, model, part.select_columns(cols).x, y, part.pseudonyms, columns=cols)
    release = noised_release(scores, 1.0, SecureRandom(3))
    metrics = release.metrics(tpl, 1.0, 0.5)
    assert set(metrics) == {"count", "concordant", "epsilon"}
    agg = aggregate([metrics], "survival")
    assert 0.6 < agg["eval_anchored_concordance"] < 0.95


# -- multi-class ------------------------------------------------------------------------------------

def test_softmax_template_needs_classes_and_matches_autograd() -> None:
    tpl = get_template("softmax_regression")
    with pytest.raises(TemplateError, match="n_classes"):
        tpl.build(4)
    assert tpl.build(4, n_classes=3)[0].out_features == 3
    out = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 1]).float()
    tpl.per_sample_loss(out, y).sum().backward()
    assert out.grad is not None
    torch.testing.assert_close(tpl.output_grad(out.detach(), y), out.grad)


def test_softmax_dp_training_beats_majority_on_age_band() -> None:
    x, y, _names = age_band_dataset()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    tr, te = idx[:2000], idx[6000:]
    tpl = get_template("softmax_regression")
    plan = plan_study(3.0, 1e-5, rounds=1, n_patients=len(tr), batch_size=64, steps_per_round=150,
                      evaluation=False)
    result = train_round(tpl, initial_state(tpl, x.shape[1], n_classes=3), x[tr], y[tr],
                         noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                         local_steps=150, clip=1.0, lr=0.5, delta=1e-5, seed=2, n_classes=3)
    model = unpack(tpl.build(x.shape[1], n_classes=3), result.state)
    metrics = tpl.evaluate(model, x[te], y[te])
    base = tpl.trivial_baseline(y[tr], x[te], y[te])
    assert set(metrics) >= {"accuracy", "macro_f1", "loss"}
    assert metrics["macro_f1"] > base["macro_f1"] + 0.1
    central = train_nonprivate(tpl, initial_state(tpl, x.shape[1], n_classes=3), x[tr], y[tr],
                               batch_size=32, steps=300, lr=0.1, n_classes=3)
    assert metrics["accuracy"] > base["accuracy"] + 0.03
    central_metrics = tpl.evaluate(unpack(tpl.build(x.shape[1], n_classes=3), central), x[te], y[te])
    assert metrics["macro_f1"] > central_metrics["macro_f1"] - 0.05


def test_softmax_refuses_a_class_beyond_n_classes() -> None:
    with pytest.raises(DPTrainingError, match="class index 3"):
        train_round("softmax_regression", np.zeros(9, np.float32), np.zeros((2, 2)), np.array([0, 3]),
                    noise_multiplier=1.0, sample_rate=1.0, local_steps=1, clip=1.0, lr=0.1, delta=1e-5,
                    n_classes=3)


def test_time_and_event_columns_are_named_for_studies() -> None:
    assert TIME_COLUMN == "time" and EVENT_COLUMN == "event"
