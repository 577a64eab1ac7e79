"""The 784-128-10 network, its training presets and one training step written once.

The step is written against a `Compute` object that performs the network's matrix products
and elementwise operations. `LocalCompute` does them with numpy in this process (the
centralized reference, `--nodes 0`); the coordinator's `DistributedCompute` turns the same
calls into disguised batches for nodes. Because both run this one function, a distributed run
differs from the centralized one only in the order floating-point partial sums are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

INPUTS, HIDDEN, CLASSES = 784, 128, 10


@dataclass(frozen=True)
class Preset:
    """How to train: data scaling, batch size, loss, optimizer, precision."""

    name: str
    epochs: int
    batch_size: int | None  # None: full batch (all training images each step)
    dtype: str
    learning_rate: float
    loss: str  # "mse" (the notebook's squared error on sigmoid outputs) | "xent" (softmax cross-entropy)
    optimizer: str  # "sgd" (w += lr * dw, the notebook's sign convention) | "adam"
    inputs: str  # "raw" (0..255 as floats) | "standardize" (per-pixel mean/std of the training set)
    init: str  # "notebook" (RandomState(402).randn * 0.01) | "scaled" (randn / sqrt(fan_in))
    # The training seed (initial weights, mini-batch order). None: drawn from the run's secret, so
    # nothing a node can read in the source anchors the run. Only the `seed` preset keeps the
    # notebook's public 402, by definition (its initial weights are public; the ledger says so).
    seed: int | None = None
    schedule: str = "constant"  # "constant" | "cosine" (learning rate decays to 0 over the run)


PRESETS = {
    # The notebook's run with its bias bugs fixed (see docs/design.md).
    "seed": Preset(name="seed", epochs=15, batch_size=None, dtype="float64", learning_rate=0.05,
                   loss="mse", optimizer="sgd", inputs="raw", init="notebook", seed=402),
    # A preset that trains: standardized inputs, mini-batches, softmax cross-entropy, Adam with
    # a cosine learning-rate decay. Same network shape.
    "default": Preset(name="default", epochs=20, batch_size=128, dtype="float32", learning_rate=2e-3,
                      loss="xent", optimizer="adam", inputs="standardize", init="scaled",
                      schedule="cosine"),
}


def get_preset(name: str, *, epochs: int | None = None, dtype: str | None = None) -> Preset:
    preset = PRESETS[name]
    if epochs is not None:
        preset = replace(preset, epochs=epochs)
    if dtype is not None:
        preset = replace(preset, dtype=dtype)
    return preset


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Elementwise logistic function; saturates to 0 without an overflow warning."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, c) logits."""
    shifted = z - z.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def training_seed(preset: Preset, secret: int) -> list[int]:
    """Seed material for initial weights and sample order: the preset's public seed if it has one
    (only `seed`), else the run's secret (an int of up to 256 bits)."""
    if preset.seed is not None:
        return [int(preset.seed)]
    return [int(secret) >> (64 * i) & ((1 << 64) - 1) for i in range(4)] + [7]  # 7: "training", not the plan


def init_params(preset: Preset, seed: list[int] | None = None) -> dict[str, np.ndarray]:
    """Initial w1 (784,128), b1 (128,), w2 (128,10), b2 (10,) in the preset's dtype.

    The notebook's init is RandomState(402); every other init draws from `seed` (training_seed)."""
    if preset.init == "notebook":
        rng = np.random.RandomState(preset.seed if preset.seed is not None else 402)
        w1 = rng.randn(INPUTS, HIDDEN) * 0.01
        w2 = rng.randn(HIDDEN, CLASSES) * 0.01
    else:
        if seed is None:
            raise ValueError("init_params needs the run's training seed for this preset")
        gen = np.random.default_rng(seed + [0])
        w1 = gen.standard_normal((INPUTS, HIDDEN)) / math.sqrt(INPUTS)
        w2 = gen.standard_normal((HIDDEN, CLASSES)) / math.sqrt(HIDDEN)
    dt = np.dtype(preset.dtype)
    return {"w1": w1.astype(dt), "b1": np.zeros(HIDDEN, dt), "w2": w2.astype(dt), "b2": np.zeros(CLASSES, dt)}


def prepare_inputs(train_images: np.ndarray, test_images: np.ndarray, preset: Preset) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 784) images -> the float matrices the network reads, train and test."""
    dt = np.dtype(preset.dtype)
    if preset.inputs == "raw":
        return train_images.astype(dt), test_images.astype(dt)
    train = train_images.astype(np.float64) / 255.0
    mean = train.mean(axis=0)
    std = train.std(axis=0) + 0.05  # keeps near-constant border pixels from blowing up
    return ((train - mean) / std).astype(dt), ((test_images / 255.0 - mean) / std).astype(dt)


def input_affine(train_images: np.ndarray, preset: Preset) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta), float64 (784,): prepare_inputs is the map raw -> raw * alpha + beta per pixel
    (up to the preset dtype's rounding). A distributed compute shares raw pixels and applies the map
    itself, so a pixel that is zero stays an exact zero whatever the standardization does."""
    if preset.inputs == "raw":
        return np.ones(train_images.shape[1]), np.zeros(train_images.shape[1])
    train = train_images.astype(np.float64) / 255.0
    mean = train.mean(axis=0)
    std = train.std(axis=0) + 0.05
    return 1.0 / (255.0 * std), -mean / std


def one_hot(labels: np.ndarray, dtype) -> np.ndarray:
    """(n,) labels 0..9 -> (n, 10) one-hot."""
    out = np.zeros((labels.shape[0], CLASSES), dtype=dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


class LocalCompute:
    """The network's operations computed here with numpy: the centralized reference.

    `images[which]` are the (n, 784) input matrices ("train", "test").
    """

    def __init__(self, images: dict[str, np.ndarray]):
        self.images = images

    def x_w1(self, which: str, idx: np.ndarray | None, w1: np.ndarray) -> np.ndarray:
        """X[idx] (b,784) @ w1 (784,128) -> (b,128); idx None means every row."""
        x = self.images[which] if idx is None else self.images[which][idx]
        return x @ w1

    def a1_w2(self, a1: np.ndarray, w2: np.ndarray) -> np.ndarray:
        """(b,128) @ (128,10) -> (b,10)"""
        return a1 @ w2

    def dw2(self, a1: np.ndarray, dz2: np.ndarray) -> np.ndarray:
        """a1^T (128,b) @ dz2 (b,10) -> (128,10)"""
        return a1.T @ dz2

    def da1(self, dz2: np.ndarray, w2: np.ndarray) -> np.ndarray:
        """dz2 (b,10) @ w2^T (10,128) -> (b,128)"""
        return dz2 @ w2.T

    def dw2_da1(self, a1: np.ndarray, dz2: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both products that need only dz2 (a distributed compute sends them together)."""
        return self.dw2(a1, dz2), self.da1(dz2, w2)

    def dw1(self, idx: np.ndarray | None, dz1: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """X[idx]^T (784,b) @ dz1 (b,128) -> (784,128). `labels` (b,) lets a distributed compute
        hide dz1's class structure; the product does not depend on them."""
        x = self.images["train"] if idx is None else self.images["train"][idx]
        return x.T @ dz1

    # Elementwise operations: on the coordinator unless `--offload all`.
    def sigmoid(self, z, tensor="activations"):
        return sigmoid(z)

    def sub(self, a, b, tensor="activations"):
        return a - b

    def square(self, a, tensor="activations"):
        return a * a

    def mul(self, a, b, tensor="activations"):
        return a * b

    def step_done(self) -> None:
        """Called at every step boundary (membership changes take effect there)."""


@dataclass
class StepResult:
    cost: float
    correct: int  # training samples classified correctly by this step's forward pass
    count: int


@dataclass
class OptimizerState:
    """Adam moments and the step counter; empty for plain SGD."""

    t: int = 0
    moments: dict[str, np.ndarray] = field(default_factory=dict)


def learning_rate(preset: Preset, step: int, total_steps: int) -> float:
    if preset.schedule == "cosine" and total_steps > 0:
        return preset.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return preset.learning_rate


def forward(compute, which: str, idx, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """a1 (b,128), a2-or-logits (b,10) for rows idx of `which`. The output is sigmoid for mse."""
    z1 = compute.x_w1(which, idx, params["w1"]) + params["b1"]
    a1 = compute.sigmoid(z1, "activations")
    z2 = compute.a1_w2(a1, params["w2"]) + params["b2"]
    return a1, z2


def train_step(compute, params: dict[str, np.ndarray], idx, labels_onehot: np.ndarray, labels: np.ndarray,
               preset: Preset, opt: OptimizerState, lr: float) -> StepResult:
    """One step on rows idx of the training set (None: all). Updates params (and opt) in place."""
    m = labels_onehot.shape[0]
    dt = params["w1"].dtype
    a1, z2 = forward(compute, "train", idx, params)
    if preset.loss == "mse":
        # The notebook's formulas, biases included.
        a2 = compute.sigmoid(z2, "outputs")
        delta = compute.sub(a2, labels_onehot, "labels")
        cost = float(np.sum(compute.square(delta, "outputs")) / (2 * m))
        dy = delta * dt.type(-1.0 / m)
        # Same association as the notebook: (dY * a2) * (1 - a2).
        dz2 = compute.mul(compute.mul(dy, a2, "gradients"), compute.sub(1.0, a2, "outputs"), "gradients")
        scores = a2
    else:
        p = softmax(z2)
        cost = float(-np.mean(np.log(np.maximum(p[np.arange(m), labels], 1e-12))))
        dz2 = (p - labels_onehot) * dt.type(1.0 / m)
        dz2 = -dz2  # ascent direction, so the update below is `+= lr * d` for both losses
        scores = z2
    dw2, da1 = compute.dw2_da1(a1, dz2, params["w2"])
    dz1 = compute.mul(compute.mul(da1, a1, "gradients"), compute.sub(1.0, a1, "activations"), "gradients")
    dw1 = compute.dw1(idx, dz1, labels)
    grads = {"w1": dw1, "b1": dz1.sum(axis=0), "w2": dw2, "b2": dz2.sum(axis=0)}
    _apply_update(params, grads, preset, opt, lr)
    compute.step_done()
    correct = int(np.count_nonzero(np.argmax(scores, axis=1) == labels))
    return StepResult(cost=cost, correct=correct, count=m)


def _apply_update(params, grads, preset: Preset, opt: OptimizerState, lr: float) -> None:
    """Gradient step in the ascent direction `grads` (the notebook adds lr * dw)."""
    dt = params["w1"].dtype
    if preset.optimizer == "sgd":
        # Order as in the notebook: w2, b2, w1, b1.
        for name in ("w2", "b2", "w1", "b1"):
            params[name] += dt.type(lr) * grads[name]
        return
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    opt.t += 1
    c1 = 1.0 - beta1 ** opt.t
    c2 = 1.0 - beta2 ** opt.t
    for name in ("w2", "b2", "w1", "b1"):
        g = grads[name]
        m = opt.moments.setdefault("m_" + name, np.zeros_like(params[name]))
        v = opt.moments.setdefault("v_" + name, np.zeros_like(params[name]))
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        params[name] += dt.type(lr) * (m / c1) / (np.sqrt(v / c2) + eps)


def evaluate(compute, which: str, params, labels: np.ndarray, preset: Preset) -> float:
    """Accuracy of params on every row of `which` (the test set: a full forward pass, biases included)."""
    _, z2 = forward(compute, which, None, params)
    # For the squared-error preset the notebook takes argmax of the sigmoid outputs; saturated
    # outputs can tie at 1.0 where the logits would not, so do exactly the same.
    scores = compute.sigmoid(z2, "outputs") if preset.loss == "mse" else z2
    return float(np.count_nonzero(np.argmax(scores, axis=1) == labels) / labels.shape[0])
