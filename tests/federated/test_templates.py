"""Model templates: registry, deterministic init, loss and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federated.templates import TemplateError, get_template, list_templates
from federated.weights import pack


def test_registry_has_classification_and_regression_templates() -> None:
    tasks = {name: t.task for name, t in list_templates().items()}
    assert tasks["logistic_regression"] == "binary"
    assert tasks["mlp_classifier"] == "binary"
    assert tasks["linear_regression"] == "regression"
    assert tasks["mlp_regressor"] == "regression"


def test_unknown_template_lists_the_choices() -> None:
    with pytest.raises(TemplateError, match=r"template: unknown template 'resnet'.*logistic_regression"):
        get_template("resnet")


@pytest.mark.parametrize("name", sorted(list_templates()))
def test_init_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    tpl = get_template(name)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = pack(tpl.build(12, seed=7, n_classes=3))
    b = pack(tpl.build(12, seed=7, n_classes=3))
    assert torch.equal(torch.rand(1), expected_next)
    assert np.array_equal(a, b)
    if tpl.hidden:
        assert not np.array_equal(a, pack(tpl.build(12, seed=8, n_classes=3)))
    else:
        assert not a.any()  # linear models start at zero


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_feature_count_is_refused(bad: object) -> None:
    with pytest.raises(TemplateError, match="n_features"):
        get_template("mlp_classifier").build(bad)  # type: ignore[arg-type]


def test_classification_metrics() -> None:
    tpl = get_template("logistic_regression")
    model = tpl.build(1)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 1], dtype=np.float32)
    m = tpl.evaluate(model, x, y)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["auroc"] == pytest.approx(1.0)
    assert m["num_examples"] == 4
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(x[:, 0]), torch.tensor(y))
    assert m["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    # AUROC is undefined with one class: omitted, not faked
    assert "auroc" not in tpl.evaluate(model, x[1:], y[1:])
    assert tpl.evaluate(model, x[:0], y[:0]) == {"num_examples": 0.0}


def test_regression_metrics_in_original_units() -> None:
    tpl = get_template("linear_regression")
    model = tpl.build(2)  # zero weights: predicts 0
    x = np.zeros((2, 2), dtype=np.float32)
    y = np.array([1.0, -3.0], dtype=np.float32)
    m = tpl.evaluate(model, x, y, target_scale=10.0)
    assert m["mae"] == pytest.approx(20.0)
    assert m["rmse"] == pytest.approx(np.sqrt(5.0) * 10)


def _single_output() -> list[str]:
    """Templates whose loss is a function of one output per record (binary, regression);
    multi-class and survival have their own tests (tests/federated/test_survival.py)."""
    return [n for n, t in list_templates().items() if t.task in ("binary", "regression")]


def test_per_sample_loss_has_one_value_per_record() -> None:
    for name in _single_output():
        tpl = get_template(name)
        out = tpl.build(3)(torch.zeros(5, 3))
        assert tpl.per_sample_loss(out, torch.ones(5)).shape == (5,)


def test_shape_mismatch_is_refused() -> None:
    tpl = get_template("logistic_regression")
    with pytest.raises(TemplateError, match="do not match"):
        tpl.evaluate(tpl.build(2), np.zeros((3, 2)), np.zeros(2))


def test_trivial_baselines() -> None:
    clf = get_template("logistic_regression")
    base = clf.trivial_baseline(np.array([1, 1, 0]), np.zeros((4, 1)), np.array([1, 0, 1, 1]))
    assert base["accuracy"] == pytest.approx(0.75)
    reg = get_template("linear_regression")
    base = reg.trivial_baseline(np.array([1.0, 3.0]), np.zeros((2, 1)), np.array([2.0, 4.0]),
                                target_scale=2.0)
    assert base["mae"] == pytest.approx(2.0)


def test_closed_form_output_gradient_matches_autograd() -> None:
    for name in _single_output():
        tpl = get_template(name)
        out = torch.randn(9, 1, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = (torch.arange(9) % 2).float()
        tpl.per_sample_loss(out, y).sum().backward()
        assert out.grad is not None
        torch.testing.assert_close(tpl.output_grad(out.detach(), y), out.grad.reshape(-1))
