"""Any MLP (the presets' networks by default: the notebook's 784-128-10 sigmoid for `seed`,
784-2048-10 ReLU for `default` and `adam`), its training presets and one training step
written once, over a list of layers.

The step is written against a `Compute` object that performs the network's matrix products;
the activations, the loss and the other elementwise operations are the step's own, computed
where it runs (the coordinator). `LocalCompute` does the products with numpy in this process (the
centralized reference, `--nodes 0`); the coordinator's `DistributedCompute` turns the same
calls into disguised batches for nodes. Because both run this one function, a distributed run
differs from the centralized one only in the order floating-point partial sums are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from enshuffle.momentum import momentum_step as step_in_blocks

INPUTS, CLASSES = 784, 10
NOTEBOOK_LAYERS = (INPUTS, 128, CLASSES)  # the notebook's network: the seed preset's
DEFAULT_LAYERS = (INPUTS, 2048, CLASSES)  # the default preset's: wide enough for the nodes' help to pay
ACTIVATIONS = ("sigmoid", "relu")  # of the hidden units; the notebook's is sigmoid
MAX_WIDTH = 65536  # a hidden layer wider than this is a typo, not a network


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
    # The network: units per layer, inputs first and classes last (784, hidden..., 10), and the
    # hidden units' activation. Layer l (1-based) has weights w{l} (layers[l-1], layers[l]) and
    # biases b{l}, so the notebook's w1, b1, w2, b2 keep their names.
    layers: tuple[int, ...] = NOTEBOOK_LAYERS
    activation: str = "sigmoid"
    # The first layer's optimizer: "same" (the preset's `optimizer`, applied here) or "momentum"
    # (SGD with momentum 0.9 at `w1_learning_rate`, on the preset's schedule): a linear optimizer,
    # which the resident disguise runs on the nodes, in each node's own basis (docs/design.md,
    # "Resident weights"); the other layers keep `optimizer`.
    w1_optimizer: str = "same"
    w1_learning_rate: float = 0.0
    # The hidden-to-hidden layers' optimizer (w2 .. w{L-1}): "same" or "momentum" (SGD with
    # momentum at `w1_learning_rate`, as w1): the resident disguise keeps those layers on the
    # nodes too, each node updating its block of rows in its own basis.
    hidden_optimizer: str = "same"
    # Which training images `--limit N` keeps: "balanced" (the same number of each class, each
    # class's first images in file order: the subset's class counts are equal, so a node that
    # groups its rows by class cannot name the groups by their sizes) or "first" (the first N, as
    # the notebook does: the seed preset's).
    subset: str = "balanced"

    @property
    def depth(self) -> int:
        """Weight layers: 2 for 784-2048-10."""
        return len(self.layers) - 1

    @property
    def hidden(self) -> int:
        """The first hidden layer's width: the units w1 maps the pixels onto."""
        return self.layers[1]

    @property
    def momentum_layers(self) -> tuple[int, ...]:
        """The hidden-to-hidden layers (2 .. L-1) trained by SGD with momentum (`hidden_optimizer`)."""
        return tuple(range(2, self.depth)) if self.hidden_optimizer == "momentum" else ()

    @property
    def weight_names(self) -> tuple[str, ...]:
        return weight_names(self.layers)

    def describe(self) -> str:
        """784-128-10 sigmoid."""
        return "-".join(str(n) for n in self.layers) + f" {self.activation}"


PRESETS = {
    # The notebook's run with its bias bugs fixed (see docs/design.md).
    "seed": Preset(
        name="seed",
        epochs=15,
        batch_size=None,
        dtype="float64",
        learning_rate=0.05,
        loss="mse",
        optimizer="sgd",
        inputs="raw",
        init="notebook",
        seed=402,
        subset="first",
    ),
    # A preset that trains: standardized inputs, mini-batches, softmax cross-entropy, Adam with
    # a cosine learning-rate decay, on a 784-2048-10 ReLU network: at that width the resident
    # first layer costs the coordinator less than computing the step alone, so `--offload auto`
    # ships it (the notebook's 784-128-10 is too small for shipping to pay).
    # The first layer trains with SGD and momentum (its weights stay on the nodes, which update
    # them in their own secret basis); the rest with Adam.
    "default": Preset(
        name="default",
        epochs=20,
        batch_size=128,
        dtype="float32",
        learning_rate=2e-3,
        loss="xent",
        optimizer="adam",
        inputs="standardize",
        init="scaled",
        schedule="cosine",
        layers=DEFAULT_LAYERS,
        activation="relu",
        w1_optimizer="momentum",
        w1_learning_rate=0.5,
        hidden_optimizer="momentum",
    ),
}
# The default preset (its network too) as it was before its first layer moved to the nodes: Adam
# on every layer, so w1 is re-sent each step under the share disguise. Kept as the audit's control (the weight
# trajectory attack breaks it) and for comparison.
PRESETS["adam"] = replace(
    PRESETS["default"], name="adam", w1_optimizer="same", w1_learning_rate=0.0, hidden_optimizer="same"
)


def weight_names(layers) -> tuple[str, ...]:
    """w1, b1, w2, b2, ... for a network with these layer widths."""
    return tuple(f"{kind}{l}" for l in range(1, len(layers)) for kind in ("w", "b"))


def check_layers(layers) -> tuple[int, ...]:
    """The layer widths as a tuple, or ValueError saying what is wrong with them."""
    layers = tuple(int(n) for n in layers)
    if len(layers) < 2:
        raise ValueError("a network needs at least its inputs and its classes, e.g. 784,128,10")
    if layers[0] != INPUTS or layers[-1] != CLASSES:
        raise ValueError(
            f"layers must start with the {INPUTS} pixels and end with the {CLASSES} classes, "
            f"got {','.join(map(str, layers))}"
        )
    bad = [n for n in layers[1:-1] if not 1 <= n <= MAX_WIDTH]
    if bad:
        raise ValueError(f"hidden widths must be 1..{MAX_WIDTH}, got {bad[0]}")
    return layers


def get_preset(
    name: str,
    *,
    epochs: int | None = None,
    dtype: str | None = None,
    layers: tuple[int, ...] | None = None,
    activation: str | None = None,
) -> Preset:
    preset = PRESETS[name]
    if epochs is not None:
        preset = replace(preset, epochs=epochs)
    if dtype is not None:
        preset = replace(preset, dtype=dtype)
    if layers is not None:
        preset = replace(preset, layers=check_layers(layers))
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        preset = replace(preset, activation=activation)
    return preset


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Elementwise logistic function; saturates to 0 without an overflow warning."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, z.dtype.type(0))


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
    """Initial w{l} (layers[l-1], layers[l]) and zero b{l} (layers[l],), in the preset's dtype;
    for 784-128-10: w1 (784,128), b1 (128,), w2 (128,10), b2 (10,).

    The notebook's init is RandomState(402); every other init draws from `seed` (training_seed).
    Layers are drawn in order, so a 2-layer network gets exactly the notebook's weights."""
    shapes = list(zip(preset.layers[:-1], preset.layers[1:]))
    if preset.init == "notebook":
        rng = np.random.RandomState(preset.seed if preset.seed is not None else 402)
        weights = [rng.randn(fan_in, fan_out) * 0.01 for fan_in, fan_out in shapes]
    else:
        if seed is None:
            raise ValueError("init_params needs the run's training seed for this preset")
        gen = np.random.default_rng(seed + [0])
        weights = [gen.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in) for fan_in, fan_out in shapes]
    dt = np.dtype(preset.dtype)
    params = {}
    for l, w in enumerate(weights, start=1):
        params[f"w{l}"] = w.astype(dt)
        params[f"b{l}"] = np.zeros(w.shape[1], dt)
    return params


def init_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """Each weight's shape: w{l} (layers[l-1], layers[l]), b{l} (layers[l],)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for l, (fan_in, fan_out) in enumerate(zip(preset.layers[:-1], preset.layers[1:]), start=1):
        shapes[f"w{l}"], shapes[f"b{l}"] = (fan_in, fan_out), (fan_out,)
    return shapes


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


W1_MOMENTUM = 0.9  # the first layer's momentum when it trains with SGD and momentum (resident or not)


def momentum_step(
    params: dict[str, np.ndarray],
    opt: "OptimizerState",
    lr: float,
    name: str = "w1",
    g: np.ndarray | None = None,
    lhs: np.ndarray | None = None,
    dz: np.ndarray | None = None,
) -> None:
    """buf = W1_MOMENTUM buf + g (float64, kept in opt as "buf_<name>"); <name> += lr buf, the
    step lr buf rounded once to the weights' dtype. The step every compute that trains w1 (or a
    momentum hidden layer) here takes (the resident nodes take the same one in their basis). The
    gradient is `g`, or lhs^T dz formed in the operands' own dtype (the cheapest centralized
    step), block by block with the step (`enshuffle.momentum`)."""
    w = params[name]
    buf = opt.moments.setdefault("buf_" + name, np.zeros(w.shape, np.float64))
    step_in_blocks(w, buf, lr, W1_MOMENTUM, g=g, lhs=lhs, dz=dz)


def hidden_momentum_step(
    a, dz, params: dict[str, np.ndarray], layer: int, lr: float, opt: "OptimizerState", basis=None
) -> np.ndarray:
    """A momentum hidden layer's backward computed here: da = dz w^T (w before the step), then SGD
    with momentum on w from g = a^T dz, preconditioned by `basis` (a resident HiddenBasis: the
    step its V-basis SGD takes in w's basis) when there is one. Under a basis g is computed in
    float64, as the resident nodes compute theirs; without one in the operands' dtype, block by
    block with the step (`momentum_step`)."""
    name = f"w{layer}"
    da = dz @ params[name].T
    if basis is not None:
        g = basis.precondition(a.T.astype(np.float64) @ dz.astype(np.float64))
        momentum_step(params, opt, lr, name, g=g)
    else:
        momentum_step(params, opt, lr, name, lhs=a, dz=dz)
    return da


class LocalCompute:
    """The network's operations computed here with numpy: the centralized reference.

    `images[which]` are the (n, 784) input matrices ("train", "test").
    """

    def __init__(self, images: dict[str, np.ndarray], basis=None):
        """`basis` (a coordinator.disguise.resident.ResidentBasis): train the resident disguise's
        reparameterized first layer (w1[P_s] = M_s V_s, SGD with momentum on V) instead of w1
        itself, and its momentum hidden layers likewise (w{l}[Q_s] = M_s V_s), exactly as a
        resident run does, for comparing with one."""
        self.images = images
        self.basis = basis

    def adopt(
        self, params: dict[str, np.ndarray], opt: "OptimizerState", fresh: bool, momentum_layers: tuple[int, ...] = ()
    ) -> None:
        """A fresh run under a basis starts from w1 = M_s V_0 (the basis's V_0), and each
        momentum hidden layer from its own basis's V_0."""
        if self.basis is not None and fresh:
            params["w1"] = self.basis.to_pixels(self.basis.v0).astype(params["w1"].dtype)
            for layer in (m for m in momentum_layers if m in self.basis.hidden_layers):
                hb = self.basis.hidden_layers[layer]
                params[f"w{layer}"] = hb.to_units(hb.v0).astype(params[f"w{layer}"].dtype)

    def hidden_step(
        self,
        a: np.ndarray,
        dz: np.ndarray,
        params: dict[str, np.ndarray],
        layer: int,
        lr: float,
        opt: "OptimizerState",
        labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """A momentum hidden layer's backward: da = dz w^T (with w before the step), then SGD with
        momentum on w from g = a^T dz, preconditioned by the basis when there is one."""
        basis = self.basis.hidden_layers.get(layer) if self.basis is not None else None
        return hidden_momentum_step(a, dz, params, layer, lr, opt, basis)

    def w1_step(
        self, params: dict[str, np.ndarray], idx, dz1: np.ndarray, labels, lr: float, opt: "OptimizerState"
    ) -> None:
        """SGD with momentum on w1 from the ascent delta dz1 (b, h1): buf = 0.9 buf + g,
        w1 += lr buf, with g = X[idx]^T dz1, preconditioned by the basis when there is one (the
        V-basis step seen in the pixel basis). Without a basis the gradient is computed block by
        block with the step (`momentum_step`)."""
        if self.basis is not None:
            momentum_step(params, opt, lr, g=self.basis.precondition(self.dw1(idx, dz1, labels)))
            return
        momentum_step(params, opt, lr, "w1", lhs=self._inputs("train", idx), dz=dz1)

    def _inputs(self, which: str, idx: np.ndarray | None) -> np.ndarray:
        """X[idx] of images[which]; idx None means every row (the array itself, no copy)."""
        return self.images[which] if idx is None else self.images[which][idx]

    def x_w1(self, which: str, idx: np.ndarray | None, w1: np.ndarray) -> np.ndarray:
        """X[idx] (b,784) @ w1 (784,h1) -> (b,h1); idx None means every row."""
        return self._inputs(which, idx) @ w1

    def a_w(self, a: np.ndarray, w: np.ndarray, layer: int) -> np.ndarray:
        """Layer `layer` >= 2, forward: a (b,n) @ w (n,m) -> (b,m); a is the previous layer's output."""
        return a @ w

    def dw_da(
        self, a: np.ndarray, dz: np.ndarray, w: np.ndarray, layer: int, labels: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer` >= 2, backward: a^T (n,b) @ dz (b,m) -> (n,m) and dz (b,m) @ w^T (m,n) -> (b,n).
        Both need only dz (a distributed compute sends them together; `labels` (b,) let it hide
        dz's class structure, as for dw1; the products do not depend on them)."""
        return a.T @ dz, dz @ w.T

    def dw1(self, idx: np.ndarray | None, dz1: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """X[idx]^T (784,b) @ dz1 (b,h1) -> (784,h1). `labels` (b,) lets a distributed compute
        hide dz1's class structure; the product does not depend on them."""
        return self._inputs("train", idx).T @ dz1

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


def activate(z: np.ndarray, preset: Preset) -> np.ndarray:
    """A hidden layer's output from its pre-activation (b,n) -> (b,n)."""
    if preset.activation == "relu":
        return relu(z)
    return sigmoid(z)


def forward(
    compute, which: str, idx, params: dict[str, np.ndarray], preset: Preset
) -> tuple[list[np.ndarray], np.ndarray]:
    """([a1, ..., a_{L-1}] each (b,n_l), the last layer's logits (b,10)) for rows idx of `which`.
    The output is sigmoid of the logits for mse."""
    z = compute.x_w1(which, idx, params["w1"]) + params["b1"]
    activations = []
    for layer in range(2, preset.depth + 1):
        activations.append(activate(z, preset))
        z = compute.a_w(activations[-1], params[f"w{layer}"], layer) + params[f"b{layer}"]
    return activations, z


def _hidden_delta(da: np.ndarray, a: np.ndarray, preset: Preset) -> np.ndarray:
    """dz of a hidden layer from da (the gradient reaching its output a)."""
    if preset.activation == "relu":
        return da * (a > 0)
    return (da * a) * (1.0 - a)


def train_step(
    compute,
    params: dict[str, np.ndarray],
    idx,
    labels_onehot: np.ndarray,
    labels: np.ndarray,
    preset: Preset,
    opt: OptimizerState,
    lr: float,
) -> StepResult:
    """One step on rows idx of the training set (None: all). Updates params (and opt) in place."""
    m = labels_onehot.shape[0]
    dt = params["w1"].dtype
    activations, z_out = forward(compute, "train", idx, params, preset)
    if preset.loss == "mse":
        # The notebook's formulas, biases included.
        a_out = sigmoid(z_out)
        delta = a_out - labels_onehot
        cost = float(np.sum(delta * delta) / (2 * m))
        dy = delta * dt.type(-1.0 / m)
        # Same association as the notebook: (dY * a2) * (1 - a2).
        dz = (dy * a_out) * (1.0 - a_out)
        scores = a_out
    else:
        p = softmax(z_out)
        cost = float(-np.mean(np.log(np.maximum(p[np.arange(m), labels], 1e-12))))
        dz = (p - labels_onehot) * dt.type(1.0 / m)
        dz = -dz  # ascent direction, so the update below is `+= lr * d` for both losses
        scores = z_out
    grads = {}
    momentum_lr = lr * preset.w1_learning_rate / preset.learning_rate
    for layer in range(preset.depth, 1, -1):  # the last layer down to layer 2
        a = activations[layer - 2]
        grads[f"b{layer}"] = dz.sum(axis=0)
        if layer in preset.momentum_layers:
            # SGD with momentum, by the compute: a resident compute runs it on the nodes
            da = compute.hidden_step(a, dz, params, layer, momentum_lr, opt, labels)
            dz = _hidden_delta(da, a, preset)
            continue
        # the last layer's dz is the loss's: no labels to hide in it, and it stays home anyway
        grads[f"w{layer}"], da = compute.dw_da(
            a, dz, params[f"w{layer}"], layer, labels if layer < preset.depth else None
        )
        dz = _hidden_delta(da, a, preset)
    grads["b1"] = dz.sum(axis=0)
    if preset.w1_optimizer == "momentum":
        # SGD with momentum, by the compute: a resident compute runs it on the nodes
        compute.w1_step(params, idx, dz, labels, momentum_lr, opt)
    else:
        grads["w1"] = compute.dw1(idx, dz, labels)
    _apply_update(params, grads, preset, opt, lr)
    compute.step_done()
    correct = int(np.count_nonzero(np.argmax(scores, axis=1) == labels))
    return StepResult(cost=cost, correct=correct, count=m)


def _apply_update(params, grads, preset: Preset, opt: OptimizerState, lr: float) -> None:
    """Gradient step in the ascent direction `grads` (the notebook adds lr * dw)."""
    dt = params["w1"].dtype
    # The notebook's order, w2, b2, w1, b1: the last layer first.
    order = [name for layer in range(preset.depth, 0, -1) for name in (f"w{layer}", f"b{layer}") if name in grads]
    if preset.optimizer == "sgd":
        for name in order:
            params[name] += dt.type(lr) * grads[name]
        return
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    opt.t += 1
    c1 = 1.0 - beta1**opt.t
    c2 = 1.0 - beta2**opt.t
    for name in order:
        g = grads[name]
        m = opt.moments.setdefault("m_" + name, np.zeros_like(params[name]))
        v = opt.moments.setdefault("v_" + name, np.zeros_like(params[name]))
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        params[name] += dt.type(lr) * (m / c1) / (np.sqrt(v / c2) + eps)


EVAL_BYTES = 64 << 20  # the largest activation matrix an evaluation pass makes at once (float64)


def evaluate(compute, which: str, params, labels: np.ndarray, preset: Preset) -> float:
    """Accuracy of params on every row of `which` (the test set: a full forward pass, biases included).

    Rows go through in blocks whose widest activation matrix stays within EVAL_BYTES, so a wide
    network's test pass does not hold 10,000 x 4,096 matrices (and their disguised copies) at
    once; the notebook's network (10,000 x 128) goes through in one block, as it always did."""
    n = labels.shape[0]
    block = max(1, EVAL_BYTES // (8 * max(preset.layers[1:])))
    correct = 0
    for lo in range(0, n, block):
        idx = None if block >= n else np.arange(lo, min(lo + block, n))
        _, z_out = forward(compute, which, idx, params, preset)
        # For the squared-error preset the notebook takes argmax of the sigmoid outputs; saturated
        # outputs can tie at 1.0 where the logits would not, so do exactly the same.
        scores = sigmoid(z_out) if preset.loss == "mse" else z_out
        correct += int(np.count_nonzero(np.argmax(scores, axis=1) == labels[lo : lo + scores.shape[0]]))
    return float(correct / n)
