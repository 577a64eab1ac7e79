"""What a coordinator run is told, once: a frozen `RunConfig`, and the typed record of it a run
directory keeps (`RunRecord`, RUN_DIR/run.json).

The command layer builds a `RunConfig` from the command line (`commands.options.run_config`)
and, on --resume, `config.resumed(RunRecord.load(run_dir))`: the run's training settings and
how it served, never by changing the parsed arguments. `CoordinatorRun`, `local_cluster_run`
and the audit read nothing else; argparse's Namespace stops at the command layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

from enshuffle.errors import UsageError
from enshuffle.model import CLASSES, INPUTS, NOTEBOOK_LAYERS, PRESETS, Preset, get_preset

DEFAULT_BIND = "tcp://127.0.0.1:5555"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Serving:
    """How `enshuffle coordinator` serves, as run.json keeps it (so --resume serves the same way).
    In a `RunConfig` built from a command line, None (False for the flags) is an option not given."""

    bind: str | None = None  # --bind
    allow: str | None = None  # --allow FILE (absolute in run.json)
    open: bool = False  # --open
    min_nodes: int | None = None  # --min-nodes
    checkpoint_every: int | None = None  # --checkpoint-every
    quarantine_after: int | None = None  # --quarantine-after
    replicate: bool = False  # --replicate

    # What `enshuffle coordinator` serves with when neither the command line nor the run says.
    DEFAULTS: ClassVar[dict[str, object]] = {
        "bind": DEFAULT_BIND,
        "allow": None,
        "open": False,
        "min_nodes": 1,
        "checkpoint_every": None,
        "quarantine_after": 3,
        "replicate": False,
    }

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def recorded(self) -> Serving:
        """As run.json keeps it: the --allow file by its absolute path (a resume may start elsewhere)."""
        return replace(self, allow=os.path.abspath(self.allow) if self.allow else None)

    @classmethod
    def from_json(cls, data: dict, path: Path) -> Serving:
        kinds: dict[str, type | tuple[type, ...]] = {
            "bind": (str, type(None)),
            "allow": (str, type(None)),
            "open": bool,
            "min_nodes": (int, type(None)),
            "checkpoint_every": (int, type(None)),
            "quarantine_after": (int, type(None)),
            "replicate": bool,
        }
        return cls(**_checked({**cls().to_json(), **data}, kinds, path, "serving."))  # an option not kept: not given

    def given(self, name: str) -> bool:
        """Whether this command line gave option `name` (--allow and --open count as one choice)."""
        if name in ("allow", "open"):
            return bool(self.allow or self.open)
        return getattr(self, name) not in (None, False)

    def completed(self, stored: Serving | None = None) -> tuple[Serving, list[str]]:
        """Every option not given here taken from `stored` (the resumed run's), then from the
        defaults; and the options taken from `stored`, as `--name value` for the resume line."""
        values, taken = {}, []
        for name, default in self.DEFAULTS.items():
            value = getattr(self, name)
            kept = getattr(stored, name) if stored is not None else None
            if not self.given(name) and kept not in (None, False):
                value = kept
                option = "--" + name.replace("_", "-")
                taken.append(option if kept is True else f"{option} {kept}")
            elif value is None:
                value = default
            values[name] = value
        return Serving(**values), taken


@dataclass(frozen=True)
class RunConfig:
    """Everything a coordinator run is told (each field is its option's value; None: not given).

    The training fields are what run.json records and a --resume takes from it; the others hold
    for this process only."""

    # Training: recorded in run.json, the run's own on --resume (a larger --epochs extends it).
    preset: str = "default"  # --preset
    epochs: int | None = None  # --epochs (None: the preset's, or the resumed run's)
    dtype: str | None = None  # --dtype
    seed: int | None = None  # --seed
    layers: tuple[int, ...] | None = None  # --layers, or --hidden between the pixels and the classes
    activation: str | None = None  # --activation
    offload: str = "matmul"  # --offload: which products go to nodes
    limit: int | None = None  # --limit: training images used
    data: str | None = None  # --data: a directory, "bundled", or None (search); a resume reads the run's
    shards: int = 1  # blocks the images and w1 are split into: --min-nodes, train's --nodes
    # This process only.
    disguise: str | None = None  # "resident", "share" or "shuffle" (the audit's control); None: the preset's
    max_exposure: float | None = None  # --max-exposure: a node may hold this share (default one block)
    save_weights: str | None = None  # --save-weights FILE.npz: the final weights
    json: bool = False  # --json: JSON lines on stdout instead of human lines
    run_dir: str | None = None  # --out RUN_DIR
    resume: bool = False  # --resume
    serving: Serving = field(default_factory=Serving)  # how it listens, admits and checks
    keep_serving: bool = False  # record `serving` in run.json (`enshuffle coordinator`)
    tui: bool = False  # --tui
    verbose: bool = False  # train's --verbose: the coordinator's log lines on stderr
    in_process: bool = False  # train's --in-process
    reference: str | None = None  # train's --reference RUN_DIR

    @property
    def data_source(self) -> str | None:
        """--data as a --resume elsewhere must read it: an absolute directory, `bundled`, or None (search)."""
        if self.data is None or self.data == "bundled":
            return self.data
        return os.path.abspath(self.data)

    def build_preset(self) -> Preset:
        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        try:
            preset = get_preset(
                self.preset, epochs=self.epochs, dtype=self.dtype, layers=self.layers, activation=self.activation
            )
        except ValueError as exc:
            raise UsageError(f"--layers: {exc}") from None
        if self.seed is not None:
            preset = replace(preset, seed=self.seed)
        return preset

    def resumed(self, record: RunRecord) -> RunConfig:
        """This configuration continuing the run `record` describes: its training settings (a
        larger --epochs extends it; fewer is refused), its data unless --data is given, its shard
        count, and, for `enshuffle coordinator`, how it served where this command line does not say."""
        if self.epochs is not None and self.epochs < record.epochs:
            raise UsageError(
                f"--epochs {self.epochs} is fewer than the {record.epochs} epochs {self.run_dir} was "
                f"started with; a resumed run can only be extended (give more epochs, or none)"
            )
        serving = self.serving.completed(record.serving)[0] if self.keep_serving else self.serving
        # A run written before networks had a shape is the notebook's 784-128-10 sigmoid network.
        return replace(
            self,
            preset=record.preset,
            epochs=self.epochs if self.epochs is not None else record.epochs,
            dtype=record.dtype,
            offload=record.offload,
            seed=record.seed,
            limit=record.limit,
            layers=tuple(record.layers or NOTEBOOK_LAYERS),
            activation=record.activation or "sigmoid",
            data=self.data if self.data is not None or not record.data_source else record.data_source,
            shards=record.shards,
            serving=serving,
        )


def network_layers(layers: tuple[int, ...] | None, hidden: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """--layers, or --hidden with the pixels and classes around it; None: the preset's network."""
    if layers:
        return tuple(layers)
    if hidden:
        return (INPUTS, *hidden, CLASSES)
    return None


def _valid(value, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return bool in kinds if isinstance(value, bool) else isinstance(value, kinds)  # True is no count


def _checked(data: dict, kinds: dict[str, type | tuple[type, ...]], path: Path, prefix: str = "") -> dict:
    """`data`'s fields named in `kinds`, each of its type; else a UsageError naming the file and them."""
    bad = [name for name, kind in kinds.items() if not _valid(data.get(name), kind)]
    if bad:
        raise UsageError(
            f"{path} lacks valid {', '.join(prefix + name for name in bad)}; it should be the JSON a coordinator wrote"
        )
    return {name: data.get(name) for name in kinds}


@dataclass(frozen=True)
class RunRecord:
    """RUN_DIR/run.json: the settings a --resume must reuse, written by the coordinator run."""

    preset: str
    epochs: int
    dtype: str
    offload: str
    seed: int | None
    shards: int
    limit: int | None = None
    data: dict | None = None  # {"images": count, "sha256": digest} of the prepared training data
    layers: tuple[int, ...] | None = None  # absent in runs written before networks had a shape
    activation: str | None = None
    data_source: str | None = None  # --data as the run read it (absolute), `bundled`, or None
    serving: Serving | None = None  # how `enshuffle coordinator` served; None for `enshuffle train`
    extra: dict = field(default_factory=dict)  # fields this version does not know, kept as they were

    REQUIRED: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "preset": str,
        "epochs": int,
        "dtype": str,
        "offload": str,
        "seed": (int, type(None)),
        "shards": int,
    }
    OPTIONAL: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "limit": (int, type(None)),
        "data": (dict, type(None)),
        "layers": (list, type(None)),
        "activation": (str, type(None)),
        "data_source": (str, type(None)),
        "serving": (dict, type(None)),
    }

    @classmethod
    def from_json(cls, data, path: Path) -> RunRecord:
        """The record in `data` (parsed from `path`); a UsageError naming the file and the fields
        that are missing or of the wrong type."""
        if not isinstance(data, dict):
            raise UsageError(f"{path} lacks valid {', '.join(cls.REQUIRED)}; it should be the JSON a coordinator wrote")
        values = _checked(data, cls.REQUIRED, path)
        values.update(_checked(data, cls.OPTIONAL, path))
        layers = values["layers"]
        if layers is not None and not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in layers):
            raise UsageError(f"{path} lacks valid layers; it should be the JSON a coordinator wrote")
        values["layers"] = tuple(layers) if layers is not None else None
        values["serving"] = Serving.from_json(values["serving"], path) if values["serving"] is not None else None
        known = set(cls.REQUIRED) | set(cls.OPTIONAL)
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict:
        """The JSON object run.json holds (and every model version's metadata as "settings")."""
        out = dict(self.extra)
        out.update(
            {
                "preset": self.preset,
                "epochs": self.epochs,
                "dtype": self.dtype,
                "offload": self.offload,
                "seed": self.seed,
                "limit": self.limit,
                "shards": self.shards,
                "data": self.data,
                "layers": list(self.layers) if self.layers is not None else None,
                "activation": self.activation,
                "data_source": self.data_source,
            }
        )
        if self.serving is not None:
            out["serving"] = self.serving.to_json()
        return out

    @classmethod
    def load(cls, run_dir: str | Path) -> RunRecord:
        path = Path(run_dir) / RUN_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{path} not found: --resume needs the RUN_DIR of an earlier coordinator run") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path} is unreadable ({exc}); it should be the JSON a coordinator wrote") from None
        return cls.from_json(data, path)

    def save(self, run_dir: str | Path) -> None:
        """Written whole or not at all (a temporary file renamed over run.json)."""
        path = Path(run_dir) / RUN_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        os.replace(tmp, path)
