"""Registry of model templates researchers may choose from.

A template is code that ships with the exchange: a researcher picks one by name and never sends
code to a hospital. Every template is an `nn.Sequential` of `nn.Linear` layers and parameter-free
element-wise activations. That restriction is deliberate: it lets `federated.dp` compute exact
per-sample gradient norms and clipped gradient sums with two matrix products per layer (no
per-sample gradient tensors, no hooks), which is what makes DP-SGD nearly as fast as ordinary
training here. A template outside that shape would need another per-sample gradient path.

Each template fixes: the task (binary or multi-class classification, regression, or survival),
the architecture, the
per-sample loss, the metrics, a deterministic initialisation from a seed, and tuned default
DP-SGD hyper-parameters (see docs/federated-dp.md for how they were chosen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # torch is imported where a torch model is built or used, not at import:
    # a hospital's Flower process trains with NumPy (`federated.numpy_mlp`) and never loads it
    import torch
    from torch import nn

Task = Literal["binary", "regression", "multiclass", "survival"]
TASKS: tuple[str, ...] = ("binary", "regression", "multiclass", "survival")
Activation = Literal["relu", "tanh"]


class TemplateError(ValueError):
    """A template name or a template's input is not acceptable."""


@dataclass(frozen=True)
class TrainingDefaults:
    """DP-SGD hyper-parameters a template trains well with (tuned on the breast cancer split,
    see docs/benchmarks/federated-dp.md). A study may override them; none of them changes the
    privacy guarantee, which only depends on noise multiplier, sample rate and step count."""

    batch_size: int = 64
    local_steps: int = 10
    rounds: int = 10
    clip: float = 1.0
    lr: float = 0.5
    momentum: float = 0.0


@dataclass(frozen=True)
class Template:
    """One registered model template."""

    name: str
    task: Task
    hidden: tuple[int, ...] = ()
    activation: Activation = "tanh"
    description: str = ""
    defaults: TrainingDefaults = field(default_factory=TrainingDefaults)

    # -- model -----------------------------------------------------------------------------
    def layer_shapes(self, n_features: int, n_classes: int | None = None
                     ) -> list[tuple[int, int, bool]]:
        """(inputs, outputs, has bias) of each Linear layer, in order: the layout of the flat
        weight array (`federated.weights.pack`: weight then bias, layer by layer), known without
        building a torch model. Checks the arguments as `build` does."""
        if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 1:
            raise TemplateError(f"n_features: must be a positive integer, got {n_features!r}")
        if self.task == "multiclass" and (not isinstance(n_classes, int) or isinstance(n_classes, bool)
                                          or n_classes < 2):
            raise TemplateError(f"n_classes: a multi-class template needs at least 2 classes, "
                                f"got {n_classes!r}")
        if self.task == "survival":
            return [(n_features, 1, False)]  # no intercept: the baseline hazard absorbs it
        shapes: list[tuple[int, int, bool]] = []
        width = n_features
        for h in self.hidden:
            shapes.append((width, h, True))
            width = h
        shapes.append((width, n_classes if self.task == "multiclass" and n_classes else 1, True))
        return shapes

    def build(self, n_features: int, seed: int = 0, n_classes: int | None = None) -> nn.Sequential:
        """A fresh model for `n_features` inputs, initialised deterministically from `seed`
        (its own torch.Generator: the global RNG is neither read nor changed, so two hospitals
        or two runs building the same template with the same seed get identical weights).
        A multi-class template needs `n_classes` (>= 2): its output has one logit per class."""
        import torch

        self.layer_shapes(n_features, n_classes)  # the argument checks
        # nn.Linear's constructor draws a default init from the global RNG; fork it so that
        # building a model never changes the caller's random state (weights come from `gen`).
        with torch.random.fork_rng(devices=[]):
            return self._build(n_features, torch.Generator().manual_seed(int(seed)),
                               n_classes if self.task == "multiclass" and n_classes else 1)

    def _build(self, n_features: int, gen: torch.Generator, n_out: int = 1) -> nn.Sequential:
        import torch
        from torch import nn

        activations: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if self.task == "survival":
            # A Cox model has no intercept: the baseline hazard absorbs it (a bias would only
            # collect noise, its gradient is identically zero).
            cox = nn.Linear(n_features, 1, bias=False)
            with torch.no_grad():
                cox.weight.zero_()
            return nn.Sequential(cox)
        layers: list[nn.Module] = []
        width = n_features
        for h in self.hidden:
            layers.append(_init_linear(nn.Linear(width, h), gen))
            layers.append(activations[self.activation]())
            width = h
        out = nn.Linear(width, n_out)
        if self.hidden:
            _init_linear(out, gen)
        else:
            # Linear models start at zero: the optimum is unique (convex loss) and a zero start
            # wastes no privacy budget undoing a random one.
            with torch.no_grad():
                out.weight.zero_()
                out.bias.zero_()
        layers.append(out)
        return nn.Sequential(*layers)

    # -- loss ------------------------------------------------------------------------------
    def per_sample_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of each record (shape [batch]); `output` is the model's [batch, 1] output.
        DP-SGD needs per-record losses; the mean of these is the ordinary training loss.
        Multi-class: `output` is [batch, classes] and `y` the class index. Survival: the loss of
        a patient depends on a risk set (`federated.survival`), not on one output."""
        from torch import nn

        if self.task == "multiclass":
            return nn.functional.cross_entropy(output, y.long(), reduction="none")
        if self.task == "survival":
            raise TemplateError("survival: the per-patient loss needs a risk set; "
                                "use federated.survival.per_patient_loss")
        out = output.reshape(-1)
        if self.task == "binary":
            return nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none")
        return 0.5 * (out - y) ** 2

    def output_grad(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d per_sample_loss / d output for each record (shape [batch]), in closed form:
        sigmoid(out) - y for logistic loss, out - y for half squared error. Lets DP-SGD skip
        autograd for these small models (tests check it against autograd and Opacus).
        Multi-class: softmax(out) - onehot(y), shape [batch, classes]."""
        import torch
        from torch import nn

        if self.task == "multiclass":
            onehot = nn.functional.one_hot(y.long(), output.shape[1]).to(output.dtype)
            return torch.softmax(output, 1) - onehot
        if self.task == "survival":
            raise TemplateError("survival: use federated.survival.per_patient_grads")
        out = output.reshape(-1)
        if self.task == "binary":
            return torch.sigmoid(out) - y
        return out - y

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over a batch."""
        return self.per_sample_loss(output, y).mean()

    # -- metrics ---------------------------------------------------------------------------
    def predict(self, model: nn.Module | Any, x: np.ndarray) -> np.ndarray:
        """Model outputs for `x`: probabilities of class 1 (binary), predictions (regression),
        the predicted class index (multi-class) or the risk score x.beta (survival). `model` is a
        torch model or a `federated.numpy_mlp.NumpyMLP` (a hospital's, without torch)."""
        from federated.numpy_mlp import NumpyMLP

        if isinstance(model, NumpyMLP):
            return model.predict(self.task, x)
        import torch

        with torch.no_grad():
            raw = model(torch.as_tensor(np.asarray(x, dtype=np.float32)))
            if self.task == "multiclass":
                return raw.argmax(1).numpy().astype(np.float64)
            out = raw.reshape(-1)
            if self.task == "binary":
                out = torch.sigmoid(out)
        return out.numpy().astype(np.float64)

    def evaluate(self, model: nn.Module, x: np.ndarray, y: np.ndarray,
                 target_scale: float = 1.0) -> dict[str, float]:
        """Loss and metrics on (x, y).

        Binary: `loss`, `accuracy` (threshold 0.5) and `auroc` (omitted when `y` holds a single
        class, where it is undefined). Regression: `loss`, `mae` and `rmse`, multiplied by
        `target_scale` so they come out in the target's original units when `y` was scaled.
        Multi-class: `loss`, `accuracy` and `macro_f1` (F1 averaged over the classes present in
        `y` or predicted). Survival: `federated.survival.exact_metrics` (it needs a subcohort).
        An empty set gives `{"num_examples": 0}` only.
        """
        if self.task == "survival":
            raise TemplateError("survival: use federated.survival.exact_metrics")
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32).reshape(-1)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise TemplateError(f"x, y: shapes {x.shape} and {y.shape} do not match")
        n = int(y.shape[0])
        if n == 0:
            return {"num_examples": 0.0}
        import torch

        with torch.no_grad():
            out = model(torch.from_numpy(x))
            loss = float(self.loss(out, torch.from_numpy(y)))
        pred = self.predict(model, x)
        metrics: dict[str, float] = {"num_examples": float(n), "loss": loss}
        # scikit-learn (with SciPy and pandas) only where metrics are computed: the
        # hospitals' executors never import it (docs/benchmarks/scale.md).
        from sklearn.metrics import f1_score, roc_auc_score

        if self.task == "multiclass":
            metrics["accuracy"] = float(np.mean(pred == y))
            metrics["macro_f1"] = float(f1_score(y.astype(np.int64), pred.astype(np.int64), average="macro"))
        elif self.task == "binary":
            metrics["accuracy"] = float(np.mean((pred >= 0.5) == (y >= 0.5)))
            if len(np.unique(y)) == 2:
                metrics["auroc"] = float(roc_auc_score(y, pred))
        else:
            err = pred - y
            metrics["mae"] = float(np.mean(np.abs(err))) * target_scale
            metrics["rmse"] = float(np.sqrt(np.mean(err**2))) * target_scale
        return metrics

    def trivial_baseline(self, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                         target_scale: float = 1.0) -> dict[str, float]:
        """What a model that ignores the features achieves (majority class / mean target):
        the bar every trained model must clear."""
        y_train = np.asarray(y_train, dtype=np.float64).reshape(-1)
        y_test = np.asarray(y_test, dtype=np.float64).reshape(-1)
        if self.task == "survival":
            return {"concordance": 0.5}
        if self.task == "multiclass":
            from sklearn.metrics import f1_score  # see evaluate

            values, counts = np.unique(y_train, return_counts=True)
            major = np.full_like(y_test, values[np.argmax(counts)])
            return {"accuracy": float(np.mean(major == y_test)),
                    "macro_f1": float(f1_score(y_test.astype(np.int64), major.astype(np.int64),
                                               average="macro"))}
        if self.task == "binary":
            majority = float(np.mean(y_train) >= 0.5)
            return {"accuracy": float(np.mean((y_test >= 0.5) == (majority >= 0.5))), "auroc": 0.5}
        mean = float(np.mean(y_train))
        return {"mae": float(np.mean(np.abs(y_test - mean))) * target_scale,
                "rmse": float(np.sqrt(np.mean((y_test - mean) ** 2))) * target_scale}


def _init_linear(layer: nn.Linear, gen: torch.Generator) -> nn.Linear:
    """PyTorch's default Linear init (uniform in +-1/sqrt(fan_in)) drawn from `gen`."""
    import torch

    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    return layer


_TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("logistic_regression", "binary",
                 description="Logistic regression (one linear layer, sigmoid output).",
                 defaults=TrainingDefaults(batch_size=128, local_steps=10, rounds=10, clip=1.0, lr=0.25)),
        Template("mlp_classifier", "binary", hidden=(32,), activation="tanh",
                 description="MLP, one hidden layer of 32 tanh units, sigmoid output.",
                 defaults=TrainingDefaults(batch_size=128, local_steps=10, rounds=10, clip=0.5, lr=0.5)),
        Template("linear_regression", "regression",
                 description="Linear regression (one linear layer, squared error).",
                 defaults=TrainingDefaults(batch_size=128, local_steps=10, rounds=10, clip=1.0, lr=0.2)),
        Template("mlp_regressor", "regression", hidden=(32,), activation="tanh",
                 description="MLP, one hidden layer of 32 tanh units, squared error.",
                 defaults=TrainingDefaults(batch_size=128, local_steps=10, rounds=10, clip=1.0, lr=0.2)),
        Template("softmax_regression", "multiclass",
                 description="Multinomial logistic regression (one linear layer, softmax output).",
                 defaults=TrainingDefaults(batch_size=64, local_steps=10, rounds=10, clip=1.0, lr=0.5)),
        Template("cox_ph", "survival",
                 description="Cox proportional hazards (linear risk score, case-cohort partial "
                             "likelihood with the public subcohort: docs/survival.md).",
                 defaults=TrainingDefaults(batch_size=256, local_steps=10, rounds=10, clip=1.0, lr=0.5)),
    )
}


def get_template(name: str) -> Template:
    """The registered template called `name`; a clear error listing the choices otherwise."""
    try:
        return _TEMPLATES[name]
    except (KeyError, TypeError):
        raise TemplateError(
            f"template: unknown template {name!r}; choose one of {sorted(_TEMPLATES)}") from None


def list_templates() -> Mapping[str, Template]:
    """All registered templates by name (read-only view)."""
    return dict(_TEMPLATES)
