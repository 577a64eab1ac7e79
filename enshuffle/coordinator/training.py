"""The training loop: epochs of steps over any Compute (centralized, in-process, or nodes).

It owns the model's parameters, the optimizer state and the position in the run, reports
each epoch to callbacks, honours pause/stop requests at step boundaries and can write model
versions to a hash chain and continue from one (`resume_from`).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from enshuffle.coordinator.report import eprint
from enshuffle.dataset import DataError, load_bundled_subset, load_dataset, training_rows
from enshuffle.errors import UsageError
from enshuffle.fpenv import flushed_denormals
from enshuffle.model import (
    NOTEBOOK_LAYERS,
    OptimizerState,
    Preset,
    evaluate,
    init_params,
    init_shapes,
    input_affine,
    learning_rate,
    one_hot,
    prepare_inputs,
    train_step,
    training_seed,
)


@dataclass
class EpochReport:
    epoch: int  # 1-based
    cost: float
    train_accuracy: float
    test_accuracy: float
    seconds: float

    def as_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cost": self.cost,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "seconds": self.seconds,
        }


@dataclass
class Inputs:
    """The matrices a run trains on, prepared once for the preset."""

    images: dict[str, np.ndarray]  # "train", "test": (n, 784) floats
    train_labels: np.ndarray
    test_labels: np.ndarray
    train_onehot: np.ndarray
    raw: dict[str, np.ndarray] | None = None  # the uint8 pixels images were prepared from
    affine: tuple[np.ndarray, np.ndarray] | None = None  # images = raw * alpha + beta, per pixel

    def source(self) -> dict:
        """Keyword arguments that let a DistributedCompute share raw pixels (see input_affine)."""
        return {"raw": self.raw, "affine": self.affine} if self.raw is not None else {}


def prepare(dataset, preset: Preset, limit: int | None = None) -> Inputs:
    train_images, train_labels = dataset.train_images, dataset.train_labels
    rows = training_rows(train_labels, limit, preset.subset)
    if rows is not None:
        train_images, train_labels = train_images[rows], train_labels[rows]
    train_images = train_images.reshape(train_images.shape[0], -1)
    test_images = dataset.test_images.reshape(dataset.test_images.shape[0], -1)
    train_x, test_x = prepare_inputs(train_images, test_images, preset)
    return Inputs(
        images={"train": train_x, "test": test_x},
        train_labels=np.asarray(train_labels),
        test_labels=np.asarray(dataset.test_labels),
        train_onehot=one_hot(train_labels, train_x.dtype),
        raw={"train": train_images, "test": test_images},
        affine=input_affine(train_images, preset),
    )


class Trainer:
    """Runs a preset's epochs on `compute`. Position: `epoch` epochs done, `step` steps into the next."""

    def __init__(
        self,
        preset: Preset,
        inputs: Inputs,
        compute,
        *,
        on_step: Callable[["Trainer"], None] | None = None,
        secret: int | None = None,
    ):
        """`secret`: the run's secret (RUN_DIR/plan.secret); initial weights and the mini-batch
        order derive from it unless the preset has a public seed. None draws a fresh one: a run
        that must be resumed or compared with another passes its own."""
        self.preset = preset
        self.inputs = inputs
        self.compute = compute
        self.on_step = on_step
        self.secret = secrets.randbits(256) if secret is None else int(secret)
        self._seed = training_seed(preset, self.secret)
        self.params = init_params(preset, self._seed)
        self.opt = OptimizerState()
        self.epoch = 0
        self.step = 0
        self._cost_sum = 0.0
        self._correct = 0
        self._seen = 0
        self._epoch_seconds = 0.0
        n = inputs.images["train"].shape[0]
        self.batch_size = preset.batch_size or n
        self.steps_per_epoch = math.ceil(n / self.batch_size)
        self._pre_update_test_accuracy: float | None = None
        self._cached_order: tuple[int, np.ndarray] | None = None
        self._flush = np.dtype(preset.dtype) == np.float32
        self._adopt(fresh=True)

    def _adopt(self, fresh: bool) -> None:
        """Tell a compute that trains a reparameterized first layer (the resident disguise, or
        the centralized reference of one) where the run starts."""
        adopt = getattr(self.compute, "adopt", None)
        if adopt is not None:
            adopt(self.params, self.opt, fresh, self.preset.momentum_layers)

    def sync(self) -> None:
        """Bring params up to date with a compute that keeps weights elsewhere (resident nodes)."""
        sync = getattr(self.compute, "sync", None)
        if sync is not None:
            sync(self.params, self.opt)

    # -- position -------------------------------------------------------------------
    @property
    def full_batch(self) -> bool:
        return self.batch_size >= self.inputs.images["train"].shape[0]

    def _order(self, epoch: int) -> np.ndarray | None:
        """Sample order of epoch `epoch` (0-based): a pure function of the training seed and epoch,
        so a resumed run visits samples exactly as an uninterrupted one would."""
        if self.full_batch:
            return None
        if self._cached_order is None or self._cached_order[0] != epoch:
            n = self.inputs.images["train"].shape[0]
            self._cached_order = (epoch, np.random.default_rng(self._seed + [1, epoch]).permutation(n))
        return self._cached_order[1]

    @property
    def finished(self) -> bool:
        return self.epoch >= self.preset.epochs

    # -- running --------------------------------------------------------------------
    def run_step(self) -> EpochReport | None:
        """One step; returns the epoch's report when this step finished an epoch.

        A float32 preset's step computes with subnormals flushed to zero, as its nodes do
        (enshuffle.fpenv): a saturated unit's tiny gradients would otherwise take the CPU's slow
        path in the elementwise work. float64 (the seed preset, exact against the notebook) keeps
        IEEE gradual underflow; the thread's mode is restored after the step."""
        if self._flush:
            with flushed_denormals():
                return self._run_step()
        return self._run_step()

    def _run_step(self) -> EpochReport | None:
        started = time.perf_counter()
        order = self._order(self.epoch)
        if self.full_batch and self.step == 0:
            # The notebook reports test accuracy from the same pre-update weights as the train pass.
            self.sync()
            self._pre_update_test_accuracy = evaluate(
                self.compute, "test", self.params, self.inputs.test_labels, self.preset
            )
        if order is None:
            idx, onehot, labels = None, self.inputs.train_onehot, self.inputs.train_labels
        else:
            idx = np.sort(order[self.step * self.batch_size : (self.step + 1) * self.batch_size])
            onehot, labels = self.inputs.train_onehot[idx], self.inputs.train_labels[idx]
        total_steps = self.preset.epochs * self.steps_per_epoch
        lr = learning_rate(self.preset, self.epoch * self.steps_per_epoch + self.step, total_steps)
        result = train_step(self.compute, self.params, idx, onehot, labels, self.preset, self.opt, lr)
        self._cost_sum += result.cost * result.count
        self._correct += result.correct
        self._seen += result.count
        self.step += 1
        self._epoch_seconds += time.perf_counter() - started
        report = None
        if self.step >= self.steps_per_epoch:
            report = self._finish_epoch()
        if self.on_step is not None:
            self.on_step(self)
        return report

    def _finish_epoch(self) -> EpochReport:
        started = time.perf_counter()
        if self.full_batch:
            test_accuracy = self._pre_update_test_accuracy
            assert test_accuracy is not None  # measured by the epoch's one step, before its update
        else:
            self.sync()
            test_accuracy = evaluate(self.compute, "test", self.params, self.inputs.test_labels, self.preset)
        seconds = self._epoch_seconds + time.perf_counter() - started
        report = EpochReport(
            epoch=self.epoch + 1,
            cost=self._cost_sum / self._seen,
            train_accuracy=self._correct / self._seen,
            test_accuracy=float(test_accuracy),
            seconds=seconds,
        )
        self.epoch += 1
        self.step = 0
        self._cost_sum, self._correct, self._seen, self._epoch_seconds = 0.0, 0, 0, 0.0
        return report

    def run_epoch(self) -> EpochReport:
        while True:
            report = self.run_step()
            if report is not None:
                return report

    # -- checkpoints ----------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays and metadata that let `restore` continue exactly from here."""
        self.sync()
        arrays = {name: self.params[name] for name in self.preset.weight_names}
        arrays.update({f"opt.{k}": v for k, v in self.opt.moments.items()})
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "opt_t": self.opt.t,
            "preset": self.preset.name,
            "dtype": self.preset.dtype,
            "epochs_total": self.preset.epochs,
            "layers": list(self.preset.layers),
            "activation": self.preset.activation,
            "partial": {"cost_sum": self._cost_sum, "correct": self._correct, "seen": self._seen},
        }
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        dt = np.dtype(self.preset.dtype)
        # A version written before networks had a shape holds the notebook's 784-128-10 sigmoid network.
        layers = tuple(meta.get("layers") or NOTEBOOK_LAYERS)
        activation = meta.get("activation") or "sigmoid"
        if layers != self.preset.layers or activation != self.preset.activation:
            raise ValueError(
                f"the model version is a {'-'.join(map(str, layers))} {activation} network, "
                f"this run's is {self.preset.describe()}"
            )
        expected = init_shapes(self.preset)
        wrong = [n for n, shape in expected.items() if n not in arrays or tuple(np.shape(arrays[n])) != shape]
        if wrong:
            raise ValueError(f"the model version's {', '.join(wrong)} do not fit a {self.preset.describe()} network")
        self.params = {name: np.array(arrays[name], dtype=dt) for name in self.preset.weight_names}
        self.opt = OptimizerState(
            t=int(meta.get("opt_t", 0)),
            moments={
                k[4:]: np.array(v, dtype=np.float64 if k.startswith("opt.resident_") else dt)
                for k, v in arrays.items()
                if k.startswith("opt.")
            },
        )
        self.epoch = int(meta["epoch"])
        self.step = int(meta["step"])
        self._adopt(fresh=False)
        partial = meta.get("partial") or {}
        self._cost_sum = float(partial.get("cost_sum", 0.0))
        self._correct = int(partial.get("correct", 0))
        self._seen = int(partial.get("seen", 0))


def load_inputs(data: str | None, preset, limit: int | None = None):
    """The training and test sets from `data` (--data: a directory, "bundled", or None to search)."""
    try:
        if data == "bundled":  # the explicit choice of the subset shipped in the package
            dataset = load_bundled_subset()
            eprint(f"data: {dataset.describe()}")
        else:
            dataset = load_dataset(data, log=eprint)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    return prepare(dataset, preset, limit)
