"""A template's model as NumPy arrays: what a hospital trains and scores, without torch.

Why: every template (`federated.templates`) is a chain of Linear layers with an element-wise
activation (tanh or ReLU) between them, and DP-SGD's "fast" engine needs only each Linear layer's
input and the loss gradient at its output (`federated.numpy_dp`). Both are a few matrix
products, so a hospital's Flower process does not need torch, whose import alone is about a
third of a hospital's memory (issue "Scale", docs/benchmarks/scale.md, "Memory per hospital").
The coordinator's ServerApp keeps torch (public pre-training, the safetensors model file).

The layout is `federated.weights.pack`'s: per Linear layer its weight [out, in] row by row,
then its bias, in order; `Template.layer_shapes` gives the shapes, so the same flat array is
the torch model's and this one's. Everything is float32, as the torch models are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from federated.weights import WeightsError


class Layout(Protocol):
    """What a model is built from: a `federated.templates.Template` (not imported here: the
    templates import this module to predict with a NumPy model)."""

    @property
    def activation(self) -> str: ...

    def layer_shapes(self, n_features: int, n_classes: int | None = None) -> list[tuple[int, int, bool]]: ...


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large |z| (same dtype as `z`)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [records, classes] logits."""
    e = np.exp(z - z.max(1, keepdims=True))
    out: np.ndarray = e / e.sum(1, keepdims=True)
    return out


def output_grad(task: str, out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d per-record loss / d output, [records, outputs], in closed form (as
    `Template.output_grad`): sigmoid(out) - y for the logistic loss, out - y for half squared
    error, softmax(out) - onehot(y) for cross-entropy."""
    if task == "multiclass":
        g = softmax(out)
        g[np.arange(out.shape[0]), np.asarray(y).astype(np.int64)] -= 1.0
        return g
    if task == "binary":
        return sigmoid(out) - np.asarray(y, dtype=out.dtype).reshape(-1, 1)
    if task == "regression":
        return out - np.asarray(y, dtype=out.dtype).reshape(-1, 1)
    raise ValueError(f"task: no per-record output gradient for {task!r} (survival: federated.numpy_dp)")


@dataclass
class NumpyMLP:
    """Linear layers (weight [out, in], bias [out] or None) with `activation` between them.

    The arrays are the model: training updates them in place (`params` lists them in the flat
    layout's order)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray | None]
    activation: str = "tanh"

    @classmethod
    def from_flat(cls, template: Layout, n_features: int, flat: np.ndarray,
                  n_classes: int | None = None) -> NumpyMLP:
        """The model of `template` for `n_features` inputs holding `flat` (a copy). Refuses, as
        `federated.weights.unpack` does, an array that is not 1-D, has the wrong length or holds
        NaN or infinite values (a broken peer must not poison a model)."""
        shapes = template.layer_shapes(n_features, n_classes)
        arr = np.asarray(flat)
        if arr.ndim != 1:
            raise WeightsError(f"weights: expected a 1-D array, got shape {arr.shape}")
        expected = sum(o * i + (o if bias else 0) for i, o, bias in shapes)
        if arr.shape[0] != expected:
            raise WeightsError(f"weights: expected {expected} values for this model, got {arr.shape[0]}")
        if not np.all(np.isfinite(arr)):
            raise WeightsError("weights: array holds NaN or infinite values")
        src = np.array(arr, dtype=np.float32)  # a copy: training never writes the caller's array
        weights: list[np.ndarray] = []
        biases: list[np.ndarray | None] = []
        offset = 0
        for n_in, n_out, bias in shapes:
            weights.append(src[offset:offset + n_out * n_in].reshape(n_out, n_in))
            offset += n_out * n_in
            if bias:
                biases.append(src[offset:offset + n_out])
                offset += n_out
            else:
                biases.append(None)
        return cls(weights, biases, template.activation)

    @classmethod
    def from_torch(cls, model: Any, activation: str) -> NumpyMLP:
        """The same model as a torch `nn.Sequential` of Linear layers and tanh/ReLU (a copy)."""
        from torch import nn

        weights: list[np.ndarray] = []
        biases: list[np.ndarray | None] = []
        for m in model:
            if isinstance(m, nn.Linear):
                weights.append(m.weight.detach().numpy().astype(np.float32, copy=True))
                bias = m.bias
                biases.append(None if bias is None else bias.detach().numpy().astype(np.float32, copy=True))
            elif not isinstance(m, (nn.Tanh, nn.ReLU)):
                raise ValueError(f"model: {type(m).__name__} is not a Linear layer, tanh or ReLU")
        return cls(weights, biases, activation)

    def params(self) -> list[np.ndarray]:
        """Weight then bias of each layer, in the flat layout's order (the arrays themselves)."""
        out: list[np.ndarray] = []
        for w, b in zip(self.weights, self.biases, strict=True):
            out.append(w)
            if b is not None:
                out.append(b)
        return out

    def flat(self) -> np.ndarray:
        """The model as one float32 vector (`federated.weights.pack`'s layout), a copy."""
        parts = [p.reshape(-1) for p in self.params()]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def _act(self, z: np.ndarray) -> np.ndarray:
        if self.activation == "tanh":
            return np.tanh(z)
        if self.activation == "relu":
            return np.maximum(z, 0).astype(z.dtype, copy=False)
        raise ValueError(f"activation: {self.activation!r} is not tanh or relu")

    def _act_grad(self, z: np.ndarray, h: np.ndarray) -> np.ndarray:
        """The activation's derivative from its input `z` and output `h` (as `federated.dp`)."""
        if self.activation == "tanh":
            return 1.0 - h * h
        return (z > 0).astype(z.dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs [records, outputs] (logits, predictions or risk scores)."""
        h = np.asarray(x, dtype=np.float32)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w.T if b is None else h @ w.T + b
            if i < last:
                h = self._act(h)
        return h

    def backprop(self, task: str, x: np.ndarray, y: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each Linear layer's input and the loss gradient at its output, per record (the fast
        engine's two ingredients; the torch twin is in `tests/federated/torch_reference.py`)."""
        inputs: list[np.ndarray] = []
        pre: list[np.ndarray] = []
        post: list[np.ndarray] = []
        h = np.asarray(x, dtype=np.float32)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            inputs.append(h)
            z = h @ w.T if b is None else h @ w.T + b
            if i < last:
                h = self._act(z)
                pre.append(z)
                post.append(h)
            else:
                h = z
        g = output_grad(task, h, y)
        grads: list[np.ndarray] = []
        for i in range(last, -1, -1):
            grads.append(g)
            if i > 0:
                g = (g @ self.weights[i]) * self._act_grad(pre[i - 1], post[i - 1])
        grads.reverse()
        return inputs, grads

    def predict(self, task: str, x: np.ndarray) -> np.ndarray:
        """As `Template.predict`: P(class 1) (binary), the prediction (regression), the class
        index (multi-class) or the risk score (survival), float64."""
        raw = self.forward(x)
        if task == "multiclass":
            return raw.argmax(1).astype(np.float64)
        out = raw.reshape(-1)
        if task == "binary":
            out = sigmoid(out)
        return out.astype(np.float64)

