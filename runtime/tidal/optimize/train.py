"""A small numpy MLP trainer (Adam, ReLU, mini-batches), seeded and reproducible.

It trains the demo classifier on hard labels and distilled students on a
teacher's soft targets; numpy alone keeps tidal free of a deep-learning
framework. Inputs are standardized while training and the scaling is folded
into the first layer afterwards, so the exported model takes raw inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from tidal.optimize.graph import Dense


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 2.0  # soft targets only: softens the teacher's distribution
    seed: int = 0


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class MlpTrainer:
    """Trains `hidden` ReLU layers plus a linear output on standardized inputs."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, config: TrainConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        sizes = [n_in, *hidden, n_out]
        # He initialisation keeps ReLU activations at unit scale through the depth.
        self.weights = [
            self.rng.standard_normal((a, b)).astype(np.float32) * np.float32(np.sqrt(2.0 / a))
            for a, b in itertools.pairwise(sizes)
        ]
        self.biases = [np.zeros(b, np.float32) for b in sizes[1:]]
        self._m = [np.zeros_like(p) for p in self._params()]
        self._v = [np.zeros_like(p) for p in self._params()]
        self._step = 0
        self.mean = np.zeros(n_in, np.float32)
        self.std = np.ones(n_in, np.float32)

    def _params(self) -> list[np.ndarray]:
        return [*self.weights, *self.biases]

    def fit_scaler(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0).astype(np.float32)
        std = x.std(axis=0)
        # A floor relative to the typical feature: dividing a near-constant feature by its tiny std
        # would fold huge weights into the first layer, which per-tensor INT8 scales cannot hold.
        self.std = np.maximum(std, 0.1 * float(std.mean()) + 1e-6).astype(np.float32)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits and the activations backprop needs."""
        acts = [(x - self.mean) / self.std]
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            z = acts[-1] @ w + b
            acts.append(np.maximum(z, 0.0) if i < len(self.weights) - 1 else z)
        return acts[-1], acts

    def epoch(self, x: np.ndarray, targets: np.ndarray, soft: bool) -> float:
        """One pass over shuffled mini-batches; the mean loss of the epoch."""
        order = self.rng.permutation(len(x))
        total = 0.0
        # One BLAS thread: on shared cores a busy neighbour made multithreaded BLAS 4x (1024-wide
        # layers) to 70x (64x256 products) slower than one thread; alone it gains less than 2x.
        with threadpool_limits(1, user_api="blas"):
            for start in range(0, len(x), self.config.batch_size):
                idx = order[start : start + self.config.batch_size]
                total += self._batch(x[idx], targets[idx], soft) * len(idx)
        return total / len(x)

    def _batch(self, x: np.ndarray, targets: np.ndarray, soft: bool) -> float:
        logits, acts = self.forward(x)
        t = self.config.temperature if soft else 1.0
        p = softmax(logits, t)
        if soft:
            q = softmax(targets, t)
            # KL(q || p) * t^2: zero when the student matches; t^2 keeps gradients at the hard-label scale.
            loss = float(np.sum(q * (np.log(q + 1e-12) - np.log(p + 1e-12))) / len(x)) * t * t
            grad = (p - q) * t / len(x)
        else:
            loss = float(-np.log(p[np.arange(len(x)), targets] + 1e-12).mean())
            grad = p.copy()
            grad[np.arange(len(x)), targets] -= 1.0
            grad /= len(x)
        grads_w, grads_b = [], []
        for i in range(len(self.weights) - 1, -1, -1):
            grads_w.append(acts[i].T @ grad + self.config.weight_decay * self.weights[i])
            grads_b.append(grad.sum(axis=0))
            if i:
                grad = (grad @ self.weights[i].T) * (acts[i] > 0)
        self._adam([*reversed(grads_w), *reversed(grads_b)])
        return loss

    def _adam(self, grads: list[np.ndarray]) -> None:
        self._step += 1
        beta1, beta2, lr = 0.9, 0.999, self.config.lr
        correction = np.sqrt(1 - beta2**self._step) / (1 - beta1**self._step)
        for p, g, m, v in zip(self._params(), grads, self._m, self._v, strict=True):
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * g * g
            p -= (lr * correction * m / (np.sqrt(v) + 1e-8)).astype(np.float32)

    def export(self) -> list[Dense]:
        """Layers that take raw inputs: the standardization is folded into the first layer."""
        w0 = self.weights[0] / self.std[:, None]
        b0 = self.biases[0] - (self.mean / self.std) @ self.weights[0]
        weights = [w0, *self.weights[1:]]
        biases = [b0, *self.biases[1:]]
        last = len(weights) - 1
        return [
            Dense(w.astype(np.float32), b.astype(np.float32), None if i == last else "Relu")
            for i, (w, b) in enumerate(zip(weights, biases, strict=True))
        ]
