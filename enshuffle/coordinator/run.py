"""A coordinator run over the network: server, trainer, model chain, state, and local nodes.

`CoordinatorRun` is what `enshuffle coordinator` and `enshuffle train --nodes K` (without
`--in-process`) execute. It writes RUN_DIR/run.json (the settings a `--resume` must reuse) and a
model version to RUN_DIR/chain after every epoch or every `--checkpoint-every` steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from enshuffle.blas import BlasThreadsUnavailable, get_blas_threads, set_blas_threads
from enshuffle.coordinator.addresses import PLACEHOLDER, volunteer_addresses
from enshuffle.coordinator.admission import Admission
from enshuffle.coordinator.chain import Chain, ChainError, record_head_in_home, trust_problem
from enshuffle.coordinator.distributed import DistributedCompute, default_disguise
from enshuffle.coordinator.ledger import ExposureLedger, ledger_axes, privacy_notes
from enshuffle.coordinator.offload import default_cost_model
from enshuffle.coordinator.reputation import QUARANTINE_AFTER
from enshuffle.coordinator.report import (eprint, join_commands, listen_text, report_epoch, report_ledger,
                                            save_weights)
from enshuffle.coordinator.server import CoordinatorServer, Listener, ServerConfig, StepAbandoned, TrainingAborted
from enshuffle.coordinator.settings import RunSettings
from enshuffle.coordinator.state import CoordinatorControl, CoordinatorState, EpochRow, VersionRow
from enshuffle.coordinator.training import Trainer
from enshuffle.errors import UsageError
from enshuffle.protocol.keys import enshuffle_home, fingerprint, load_or_create_identity

CHAIN_WRITE_ATTEMPTS = 3  # a version write that fails (OSError) is tried this often, then left for the next



@contextlib.contextmanager
def coordinator_blas_threads(threads: int = 1):
    """BLAS threads for a coordinator that serves nodes: its own products are small
    matrix-vector checks, and idle OpenBLAS threads spin, burning CPU the nodes could use."""
    try:
        before = get_blas_threads()
        set_blas_threads(threads)
    except BlasThreadsUnavailable:
        yield
        return
    try:
        yield
    finally:
        set_blas_threads(before)


EXIT_INTERRUPTED = 130  # stopped before the run finished (Ctrl-C, SIGTERM, q): resume it with --resume


def local_only(admission) -> bool:
    """True for `enshuffle train`'s admission: its own local node processes and nobody else."""
    return (admission is not None and not admission.open and admission.home is None
            and admission.allow_file is None)


def joining(endpoint: str, fingerprint: str, admission) -> tuple[list[str], list[str], str]:
    """How volunteers join, for the console and the start-up lines: the `enshuffle node` commands
    (with --invite CODE where an invite is how a new key gets in), notes on them, and who may join."""
    if local_only(admission):
        count = len(admission.auto)
        return [], [f"only the {count} local node process{'es' if count != 1 else ''} this command started "
                    f"may join; for volunteers' machines run `enshuffle coordinator`"], \
            f"who may join: only this command's {count} local node process{'es' if count != 1 else ''}"
    commands = join_commands(endpoint, fingerprint)
    notes = []
    who = ""
    if admission is not None:
        who = "who may join: " + admission.describe().removeprefix("admission: ")
        if not admission.open and admission.home is not None:
            commands = [f"{c} --invite CODE" for c in commands]
            notes.append("CODE: a fresh one from `enshuffle invite --connect ADDRESS` on this machine"
                         + (" (a key in the --allow file needs none)" if admission.allow_file else ""))
    if any(PLACEHOLDER in c for c in commands):
        notes.append(f"replace {PLACEHOLDER} with this machine's address as the volunteers reach it")
    elif commands and ("127.0.0.1" in commands[0] or "[::1]" in commands[0]):
        notes.append("a loopback address: only nodes on this machine can connect; bind tcp://0.0.0.0:PORT "
                     "for others")
    return commands, notes, who


def stamped(line: str) -> None:
    """A headless coordinator's log line, timestamped as a node's are (for a log read hours later)."""
    eprint(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")


def default_run_dir() -> str:
    return os.path.join("runs", time.strftime("run-%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2))


class CoordinatorRun:
    def __init__(self, settings: RunSettings, preset, inputs, *, bind: str, shards: int, min_nodes: int,
                 run_dir: str | None, resume: bool = False, checkpoint_every: int | None = None,
                 state: CoordinatorState | None = None, control: CoordinatorControl | None = None,
                 home: Path | None = None, quiet: bool = False, admission=None, serving: dict | None = None,
                 data_source: str | None = None, command: str = "coordinator"):
        self.settings = settings
        self.preset = preset
        self.inputs = inputs
        self.min_nodes = min_nodes
        self.checkpoint_every = checkpoint_every
        self.state = state or CoordinatorState()
        self.control = control or CoordinatorControl()
        self.quiet = quiet
        self.print_reports = True  # epoch lines and the final table on stdout (off under the TUI)
        self.local_nodes = False  # started by `enshuffle train` with its own node processes
        self.give_up = None  # () -> why waiting for the first nodes is hopeless, or None (wait on)
        self.command = command  # the `enshuffle` command that runs it, for the commands it prints
        self.exit_status: int | None = None
        self.identity = load_or_create_identity("coordinator", home)
        self.home = home
        self.run_dir = Path(run_dir) if run_dir else None
        self.chain = Chain(self.run_dir, signer=self.identity) if self.run_dir else None
        self._settings = {"preset": preset.name, "epochs": preset.epochs, "dtype": preset.dtype,
                          "offload": settings.offload, "seed": preset.seed, "limit": settings.limit,
                          "shards": shards, "data": data_fingerprint(inputs), "layers": list(preset.layers),
                          "activation": preset.activation, "data_source": data_source}
        if serving is not None:  # how `enshuffle coordinator` served: --resume serves the same way
            self._settings["serving"] = serving
        self.admission = admission
        config = ServerConfig(max_exposure=settings.max_exposure, replicate=settings.replicate,
                              quarantine_after=settings.quarantine_after or QUARANTINE_AFTER,
                              log=self._server_log)
        # Bound first: a coordinator that cannot listen leaves no empty run directory behind.
        listener = Listener(bind, config)
        if self.run_dir:
            try:
                self._check_run_dir(resume)
            except BaseException:
                listener.close()
                raise
        secret = plan_secret(self.run_dir) if self.run_dir else secrets.randbits(256)
        ledger = ExposureLedger(ledger_axes(preset.layers))
        # The compute hands the server it makes its plan (the slots and their statics); the
        # server is the compute's executor.
        serve = CoordinatorServer.factory(listener, self.identity, self.state, ledger, config=config,
                                          control=self.control, admission=admission)
        try:
            self.compute = DistributedCompute(inputs.images, shards, np.random.default_rng(secret), serve,
                                              ledger=ledger, **inputs.source(),
                                              disguise=settings.disguise or default_disguise(preset),
                                              layers=preset.layers, offload=settings.offload,
                                              cost_model=default_cost_model())
        except BaseException:
            listener.close()
            raise
        assert isinstance(self.compute.executor, CoordinatorServer)
        self.server = self.compute.executor
        # Initial weights and sample order from the same secret: nothing public anchors the run.
        self.trainer = Trainer(preset, inputs, self.compute, secret=secret)
        with self.state.lock:
            st = self.state
            st.run_id = self.server.run_id
            st.preset = preset.name
            st.bind = listen_text(self.server.endpoint)
            st.join_commands, st.join_notes, st.admission = joining(self.server.endpoint, self.identity.fingerprint,
                                                                    admission)
            st.fingerprint = self.identity.fingerprint
            st.run_dir = str(self.run_dir) if self.run_dir else None
            st.epochs_total = preset.epochs
            st.steps_per_epoch = self.trainer.steps_per_epoch
        if self.run_dir:
            if resume:
                try:
                    self._resume()
                except UsageError:
                    self.server.close("shutdown")
                    raise
                except ChainError as exc:
                    self.server.close("shutdown")
                    raise UsageError(f"cannot resume from {self.run_dir}: {exc}") from None
                except BaseException:
                    self.server.close("shutdown")
                    raise
            _atomic_write_json(self.run_dir / "run.json", self._settings)  # a new --epochs is kept
        self._steps_since_version = 0
        self._step_time_total, self._steps_timed = 0.0, 0

    def _check_run_dir(self, resume: bool) -> None:
        """Refuse what would mix two runs in one chain, before anything is started."""
        assert self.run_dir is not None and self.chain is not None  # called only with a run directory
        head_file = self.run_dir / "chain" / "HEAD"
        if not resume and head_file.exists():
            raise UsageError(f"{self.run_dir} already holds a model chain: continue it with --resume "
                             f"(and --epochs N to extend it), or choose a new --out")
        if resume:
            try:
                key = self.chain.run_key() if (self.run_dir / "chain").exists() else None
            except ChainError as exc:
                raise UsageError(f"cannot resume from {self.run_dir}: {exc}") from None
            if key is not None and key != self.identity.public_hex:
                raise UsageError(f"{self.run_dir} was signed by coordinator key {fingerprint(bytes.fromhex(key))}, "
                                 f"but this machine's key is {self.identity.fingerprint}: "
                                 f"resume with the ENSHUFFLE_HOME that ran it")
            stored = load_run_settings(str(self.run_dir)).get("data")
            if stored is not None and stored != self._settings["data"]:
                raise UsageError(f"{self.run_dir} was trained on other data ({stored.get('images')} training "
                                 f"images, digest {str(stored.get('sha256'))[:12]}) than now "
                                 f"({self._settings['data']['images']}, {self._settings['data']['sha256'][:12]}): "
                                 f"resume with the same --data and --limit")
        # A directory this run creates and never writes a version to is removed at the end.
        self._created_run_dir = not resume and not self.run_dir.exists()
        try:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            make_private(self.run_dir)
        except OSError as exc:
            raise UsageError(f"cannot create run directory {self.run_dir}: {exc.strerror}; "
                             f"choose a writable --out") from None

    # -- resume ----------------------------------------------------------------------
    def _resume(self) -> None:
        assert self.run_dir is not None and self.chain is not None  # called only with a run directory
        head = self.chain.head()
        if head is None:
            raise UsageError(f"{self.run_dir}: nothing to resume (no model version in {self.run_dir / 'chain'}); "
                             f"start without --resume")
        # Every version, not only the head: a run continued from a damaged chain would sign onto it.
        report = self.chain.verify(self.identity.fingerprint)
        if not report.ok:
            where = f" at version {report.first_bad[:12]}" if report.first_bad else ""
            raise UsageError(f"cannot resume {self.run_dir}: its chain fails verification{where}: {report.problem}; "
                             f"see `enshuffle chain verify {self.run_dir}`, restore the run directory from a copy, "
                             f"or start a new run")
        # And what `chain verify` checks of the head: every version signed by this coordinator's
        # key, and a head log that matches the head this machine recorded (a rolled-back HEAD).
        problem = trust_problem(self.chain, self.identity.fingerprint,
                                self.home if self.home is not None else enshuffle_home())
        if problem is not None:
            raise UsageError(f"cannot resume from {self.run_dir}: {problem}; `enshuffle chain verify {self.run_dir}` "
                             f"shows the same")
        arrays, meta = self.chain.load(head)
        try:
            self.trainer.restore(arrays, meta)
        except ValueError as exc:
            raise UsageError(f"cannot resume {self.run_dir} from version {head[:12]}: {exc}") from None
        if self.trainer.finished:
            raise UsageError(
                f"{self.run_dir} has finished: its head version {head[:12]} is epoch {self.trainer.epoch} of "
                f"{self.preset.epochs}, so there is nothing to resume. To train further, extend it: "
                f"`enshuffle {self.command} --out {self.run_dir} --resume --epochs N` with N > {self.preset.epochs}")
        if meta.get("epochs_total") not in (None, self.preset.epochs):
            _atomic_write_json(self.run_dir / "run.json", dict(load_run_settings(str(self.run_dir)),
                                                               epochs=self.preset.epochs))
        self.server.ledger.load(meta.get("ledger", {}))
        # Ledger rows are keyed by label: the same key must get the same label after a resume.
        self.server.labels.update({bytes.fromhex(k): v for k, v in (meta.get("labels") or {}).items()})
        with self.state.lock:
            for v in self.chain.versions():
                self.state.versions.append(_version_row(v.version_id, v.parent_id, v.metadata))
            for e in meta.get("history", []):
                self.state.epochs.append(EpochRow(**e))
            self.state.epoch = self.trainer.epoch
            self.state.step = self.trainer.step
        self.log(f"resumed from model version {head[:12]} (epoch {self.trainer.epoch}, step {self.trainer.step})")

    def log(self, line: str) -> None:
        self.state.add_log(line)
        if not self.quiet:
            stamped(line)

    def _server_log(self, line: str) -> None:
        """The server's log lines (already in the state's log): on stderr unless quiet."""
        if not self.quiet:
            stamped(line)

    # -- chain -----------------------------------------------------------------------
    def hangup(self) -> None:
        """SIGHUP: re-read the --allow file (and invited keys), and lift every quarantine."""
        if self.admission is not None and hasattr(self.admission, "reload"):
            line = self.admission.reload()
            self.state.add_log(line)
            if not self.quiet:
                stamped(line)
        self.control.readmit(None)  # the server logs whom

    def privacy_notes(self) -> list[str]:
        return privacy_notes(self.preset, self.server.bound_raised, self.compute.disguise)

    def write_version(self, report=None) -> str | None:
        if self.chain is None:
            return None
        arrays, meta = self.trainer.checkpoint()
        with self.state.lock:
            history = [e.__dict__ for e in self.state.epochs]
        last = report.as_dict() if report is not None else (history[-1] if history else None)
        meta.update({
            "run_id": self.server.run_id, "created": time.time(), "settings": self._settings,
            "metrics": ({"cost": last["cost"], "train_accuracy": last["train_accuracy"],
                         "test_accuracy": last["test_accuracy"]} if last else {}),
            "exposure": self.server.ledger.shares(), "exposure_forms": self.server.ledger.forms(),
            "exposure_bound": self.server.bound, "privacy_notes": self.privacy_notes(),
            "ledger": self.server.ledger.export(), "history": history,
            "labels": {key.hex(): label for key, label in self.server.labels.items()},
        })
        for attempt in range(CHAIN_WRITE_ATTEMPTS):
            try:
                version = self.chain.append(arrays, meta)
                record_head_in_home(self.chain, self.home if self.home is not None else enshuffle_home())
                break
            except OSError as exc:  # e.g. out of file descriptors or disk space for a moment
                # An append that failed leaves the head where it was (what it wrote is cleaned up by
                # the next one): training goes on, and the next version (or this one again) retries.
                again = attempt + 1 < CHAIN_WRITE_ATTEMPTS
                self.log(f"could not write a model version to {self.chain.dir if self.chain else 'the chain'} "
                         f"({exc.strerror or exc}); "
                         f"{'trying again' if again else 'training goes on; the next version retries'}")
                if attempt + 1 < CHAIN_WRITE_ATTEMPTS:
                    self.server.pump(timeout_ms=1000)  # nodes stay serviced while it waits
        else:
            return None
        parent = self.state.versions[-1].version_id if self.state.versions else None
        with self.state.lock:
            self.state.versions.append(_version_row(version, parent, meta))
        self._steps_since_version = 0
        return version

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> int:
        with coordinator_blas_threads():
            return self._run()

    def _run(self) -> int:
        try:
            if not self.server.wait_for_nodes(self.min_nodes, lambda: self.control.stop_requested,
                                              give_up=self.give_up):
                if self.control.stop_requested:
                    self.log("stopped before training started")
                    return self._end("stopped", EXIT_INTERRUPTED)
                self._say_final(f"gave up: {self.server.wait_problem}")
                return self._end("aborted", 1)
            connected = getattr(self.give_up, "connected", None)
            if connected is not None:
                connected()  # from here a blocked slot waits for its node to come back
            self._set_status("training")
            while not self.trainer.finished and not self.control.stop_requested:
                if self.control.paused:
                    self._set_status("paused (press p to resume)")
                    while self.control.paused and not self.control.stop_requested:
                        self.server.pump(200)
                    self._set_status("training")
                    continue
                step_started = time.monotonic()
                report = self.trainer.run_step()
                step_took = time.monotonic() - step_started
                self._steps_since_version += 1
                with self.state.lock:
                    self.state.epoch, self.state.step = self.trainer.epoch, self.trainer.step
                    # The mean time of every step this process has run: the ETA follows the work, not
                    # the wall clock, and does not swing with each step (an epoch's last step also
                    # evaluates, a node joining slows one step).
                    self._step_time_total += step_took
                    self._steps_timed += 1
                    self.state.step_seconds = self._step_time_total / self._steps_timed
                if report is not None:
                    with self.state.lock:
                        self.state.epochs.append(EpochRow(**report.as_dict()))
                    if self.print_reports:
                        report_epoch(report, self.settings.json, self.preset.epochs)
                    self.write_version(report)
                elif self.checkpoint_every and self._steps_since_version >= self.checkpoint_every:
                    self.write_version()
            if self.control.stop_requested and self._steps_since_version:
                self.write_version()
                self.log("stopped on request after finishing the step; model version written")
        except StepAbandoned as exc:
            # The unfinished step is dropped (parameters change only after a step's last product),
            # so the steps completed since the last version are kept in a new one.
            self._keep_completed_steps()
            self.log(f"stopped: {exc}; the last model version is the place to --resume from")
            return self._end("stopped", EXIT_INTERRUPTED)
        except TrainingAborted as exc:
            self._keep_completed_steps()
            self._say_final(f"training aborted: {exc}")
            return self._end("aborted", 1)
        finished = self.trainer.finished
        if self.settings.save_weights:
            save_weights(self.settings.save_weights, self.trainer.params)
        return self._end("finished" if finished else "stopped", 0 if finished else EXIT_INTERRUPTED)

    def _say_final(self, line: str) -> None:
        """A line that ends the run: logged, and on stderr even for a quiet run (not under the TUI)."""
        self.log(line)
        if self.quiet and self.print_reports:
            eprint(line)

    def _end(self, status: str, rc: int) -> int:
        """Every way a run ends: BYE to the nodes, the final figures, the state says `status`."""
        self.server.close("run-finished" if status == "finished" else "shutdown")
        self._remove_unused_run_dir()
        if self.print_reports:
            report_ledger(self.server.ledger, self.settings.json,
                          {"bytes_sent": self.server.bytes_sent, "bytes_received": self.server.bytes_received},
                          notes=self.privacy_notes())
            for line in self.summary_lines(status):
                eprint(line)
        self._finish(status)
        self.exit_status = rc
        return rc

    def _remove_unused_run_dir(self) -> None:
        """A run that ends before its first version leaves no directory behind that it created
        (only its plan secret, settings and local nodes' keys, which nothing can resume from)."""
        if self.run_dir is None or not getattr(self, "_created_run_dir", False):
            return
        with self.state.lock:
            wrote = bool(self.state.versions)
        if wrote or (self.run_dir / "chain" / "HEAD").exists():
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir_removed = True

    def summary_lines(self, status: str | None = None) -> list[str]:
        """What an operator needs once the run is over: where it got to, where its chain is, how to go on."""
        status = status or self.state.status
        with self.state.lock:
            last = self.state.epochs[-1] if self.state.epochs else None
            head = self.state.versions[-1].version_id if self.state.versions else None
        lines = [f"run {status}: epoch {self.trainer.epoch}/{self.preset.epochs}, step {self.trainer.step}"
                 + (f", test accuracy {last.test_accuracy:.4f}" if last else "")]
        if self.run_dir and head:
            lines.append(f"model chain: {self.run_dir} (head {head[:12]}); check it with "
                         f"`enshuffle chain verify {self.run_dir}`")
            command = self.command
            if status == "finished":
                lines.append(f"to train further: enshuffle {command} --out {self.run_dir} --resume "
                             f"--epochs {self.preset.epochs + 5}")
            else:
                lines.append(f"to continue: enshuffle {command} --out {self.run_dir} --resume")
        elif self.run_dir:
            lines.append(f"no model version was written to {self.run_dir}"
                         + ("; the empty run directory was removed" if getattr(self, "run_dir_removed", False) else ""))
        if self.settings.save_weights and status == "finished":
            lines.append(f"weights written to {self.settings.save_weights}")
        return lines

    def _keep_completed_steps(self) -> None:
        if self._steps_since_version:
            self.write_version()

    def _set_status(self, text: str) -> None:
        with self.state.lock:
            self.state.status = text
            self.state.paused = self.control.paused

    def _finish(self, status: str) -> None:
        with self.state.lock:
            self.state.status = status
            self.state.finished = True


def make_private(run_dir: Path) -> None:
    """A run directory holds the model, its ledger and the plan secret: 0700 for it and every
    directory in it, 0600 for every file, and a process umask of 077 so whatever this process
    writes there from now on (chain versions, run.json, checkpoints) is created private too."""
    os.umask(0o077)
    os.chmod(run_dir, 0o700)
    for root, dirs, files in os.walk(run_dir):  # never descends into a symbolic link
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # a link inside --out: its target is not ours to chmod
                os.chmod(path, 0o700)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


def data_fingerprint(inputs) -> dict:
    """What a resumed run must train on: counts and a SHA-256 of the prepared matrices and labels."""
    digest = hashlib.sha256()
    for array in (inputs.images["train"], inputs.train_labels, inputs.images["test"], inputs.test_labels):
        digest.update(np.ascontiguousarray(array).data)
    return {"images": int(inputs.images["train"].shape[0]), "sha256": digest.hexdigest()}


def plan_secret(run_dir: Path) -> int:
    """The run's secret seed for its partitions and static disguises, created on first use
    (mode 0600) so --resume draws the same ones. Never derived from anything a node can know."""
    path = Path(run_dir) / "plan.secret"
    try:
        return int(path.read_text().strip(), 16)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); it holds the run's plan secret: restore it from a "
                         f"backup, or start a new run") from None
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return int(value, 16)


def _version_row(version_id: str, parent_id: str | None, meta: dict) -> VersionRow:
    return VersionRow(version_id=version_id, parent_id=parent_id, epoch=int(meta.get("epoch", 0)),
                      step=int(meta.get("step", 0)),
                      test_accuracy=(meta.get("metrics") or {}).get("test_accuracy"),
                      created=float(meta.get("created", 0.0)),
                      metadata={k: v for k, v in meta.items() if k not in ("ledger", "history", "labels")})


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


RUN_FIELDS: dict[str, type | tuple[type, ...]] = {"preset": str, "epochs": int, "dtype": str, "offload": str,
                                                   "seed": (int, type(None)), "shards": int}


def load_run_settings(run_dir: str) -> dict:
    path = Path(run_dir) / "run.json"
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} not found: --resume needs the RUN_DIR of an earlier coordinator run") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); it should be the JSON a coordinator wrote") from None
    bad = [name for name, kind in RUN_FIELDS.items()
           if not isinstance(settings, dict) or not isinstance(settings.get(name), kind)]
    if bad:
        raise UsageError(f"{path} lacks valid {', '.join(bad)}; it should be the JSON a coordinator wrote")
    return settings


# -- local node processes ------------------------------------------------------------------
def local_node_keys(workdir: Path, count: int, prefix: str = "local") -> list[bytes]:
    """Create the local nodes' keys up front (each in its own ENSHUFFLE_HOME, under its --name), so
    the coordinator admits exactly them and nobody else."""
    keys = []
    for i in range(count):
        home = workdir / f"node-{i + 1}"
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys.append(load_or_create_identity("node", home, name=f"{prefix}-{i + 1}").public_bytes)
    return keys


def spawn_local_nodes(endpoint: str, fingerprint: str, count: int, workdir: Path,
                      threads: int = 1) -> list[subprocess.Popen]:
    """Start `count` `enshuffle node` processes, each with its own key (its own ENSHUFFLE_HOME)."""
    procs = []
    for i in range(count):
        home = workdir / f"node-{i + 1}"
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = dict(os.environ, ENSHUFFLE_HOME=str(home))
        log = open(home / "node.log", "wb")
        # A session of their own: Ctrl-C in the terminal reaches the coordinator only, which then
        # finishes its step with them and tells them BYE (else they would leave mid-step).
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "enshuffle", "node", "--connect", endpoint, "--coordinator-key", fingerprint,
             "--name", f"local-{i + 1}", "--threads", str(threads)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs


def stop_local_nodes(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def local_cluster_run(settings: RunSettings, preset, inputs, *, nodes: int, workdir: Path, run_dir: str | None = None,
                      resume: bool = False, quiet: bool = True, data_source: str | None = None) -> CoordinatorRun:
    """The coordinator of `enshuffle train --nodes K`, on loopback, admitting only the K local
    node keys it creates in `workdir` (nothing to set up, nobody else joins)."""
    admission = Admission(auto=set())
    # A kept chain (--out) is signed with this machine's coordinator key, so that --resume,
    # which checks the key, can continue it; a throw-away run uses a throw-away key.
    run = CoordinatorRun(settings, preset, inputs, bind="tcp://127.0.0.1:*", shards=nodes, min_nodes=nodes,
                         run_dir=run_dir, home=None if run_dir else workdir / "coordinator", resume=resume,
                         quiet=quiet, admission=admission, data_source=data_source, command="train")
    # The local nodes' keys are made once the run directory is accepted, in it when there is one:
    # a resumed run's local nodes are the same nodes (the same ledger rows), not new ones.
    for key in local_node_keys(local_nodes_dir(run_dir, workdir), nodes):
        admission.admit_key(key)
    with run.state.lock:
        st = run.state
        st.join_commands, st.join_notes, st.admission = joining(run.server.endpoint, run.identity.fingerprint,
                                                                admission)
    return run


def local_nodes_dir(run_dir: str | None, workdir: Path) -> Path:
    """Where `enshuffle train`'s local nodes keep their homes: in the run directory when kept."""
    return Path(run_dir) / "local-nodes" if run_dir else workdir


def run_local_cluster(settings: RunSettings, preset, inputs, *, nodes: int, run_dir: str | None = None,
                      resume: bool = False, verbose: bool = False, tui: bool = False,
                      data_source: str | None = None) -> int:
    """`enshuffle train --nodes K`: a coordinator on loopback and K local node processes."""
    with tempfile.TemporaryDirectory(prefix="enshuffle-local-") as tmp_dir:
        tmp = Path(tmp_dir)
        run = local_cluster_run(settings, preset, inputs, nodes=nodes, workdir=tmp, run_dir=run_dir, resume=resume,
                                quiet=not verbose, data_source=data_source)
        eprint(f"train: coordinator on {listen_text(run.server.endpoint)}, {nodes} local node processes, "
               f"preset {preset.name}, {preset.describe()}, {preset.dtype}, offload {settings.offload}")
        for line in run.compute.plan_lines(preset.batch_size or inputs.images["train"].shape[0]):
            eprint(f"train: {line}")
        nodes_dir = local_nodes_dir(run_dir, tmp)
        procs = spawn_local_nodes(volunteer_addresses(run.server.endpoint)[0], run.identity.fingerprint, nodes,
                                  nodes_dir)
        eprint(f"train: waiting for the {nodes} local node{'s' if nodes != 1 else ''} to connect "
               f"(at most {LOCAL_NODES_CONNECT_S:g} s)")
        run.local_nodes = True
        run.give_up = local_nodes_problem(procs, nodes_dir, time.monotonic() + LOCAL_NODES_CONNECT_S)
        try:
            if tui:
                return run_with_tui(run)
            return run_headless(run)
        finally:
            finished = run.trainer.finished
            if not run.state.finished:
                run.server.close("shutdown")
            # Nodes leave by themselves after BYE run-finished; after a stop they would wait
            # for the coordinator to come back, which a local cluster never does.
            stop_local_nodes(procs, timeout=5.0 if finished else 0.0)


LOCAL_NODES_CONNECT_S = 60.0  # local node processes that have not connected by then never will


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["(nothing logged)"])[-1].strip()


def local_nodes_problem(procs: list[subprocess.Popen], workdir: Path, deadline: float):
    """For `wait_for_nodes(give_up=...)`: why local nodes will not connect (a node exited, or
    none connected in time, with what its log says), or None while waiting still makes sense.
    Once they have connected (`problem.connected()`), only an exit is a reason: a node that lost
    its connection (e.g. while the coordinator was busy) reconnects in its own time."""
    connect_by = [deadline]

    def problem(starting: bool) -> str | None:
        exited = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
        if exited and (starting or len(exited) == len(procs)):
            i, rc = exited[0]
            return (f"local node {i + 1} exited with status {rc}: "
                    f"{_last_line(workdir / f'node-{i + 1}' / 'node.log')}")
        if starting and time.monotonic() > connect_by[0]:
            return (f"the local nodes did not connect within {LOCAL_NODES_CONNECT_S:g} s; local-1 says: "
                    f"{_last_line(workdir / 'node-1' / 'node.log')}")
        return None

    def connected() -> None:
        connect_by[0] = math.inf

    problem.connected = connected  # type: ignore[attr-defined]
    return problem


def verify_chain_message(chain) -> tuple[bool, str]:
    """What `enshuffle chain verify` checks, as (ok, one line) for the console's `v` key."""
    if chain is None:
        return False, "no run directory: start with --out RUN_DIR to keep a model chain"
    report = chain.verify(expected_fingerprint=getattr(chain.signer, "fingerprint", None))
    if report.ok and report.checked == 0:
        return True, "no model version yet: nothing to verify (the first is written after the first epoch)"
    if report.ok:
        return True, f"ok: {report.checked} versions verified"
    return False, f"FAILED at {report.first_bad[:12] if report.first_bad else '?'}: {report.problem}"


def run_headless(run: CoordinatorRun) -> int:
    """Run in this thread; the first SIGINT/SIGTERM stops gracefully (the step finishes, a model
    version is written, nodes are told BYE), a second one interrupts at once."""
    def on_signal(signum, frame):
        if run.control.stop_requested:
            raise KeyboardInterrupt
        line = f"{signal.Signals(signum).name}: finishing the step, then stopping (again to stop at once)"
        run.state.add_log(line)
        stamped(line)
        run.control.request_stop()

    def on_hangup(signum, frame):
        run.hangup()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    try:
        return run.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_with_tui(run: CoordinatorRun) -> int:
    """The console in the main thread, the run (which owns the socket) in a worker thread."""
    # textual only on the --tui path
    from enshuffle.tui.coordinator_app import CoordinatorApp, terminal_fd, terminal_gone

    status: dict = {}

    def work():
        try:
            status["rc"] = run.run()
        except Exception as exc:  # shown in the console's log, and printed once the console closes
            status["error"] = exc
            run.log(f"coordinator failed: {exc}")
            status["rc"] = 2 if isinstance(exc, UsageError) else 1
            with run.state.lock:
                run.state.finished = True

    run.quiet = True  # the server's log lines too: the console shows them
    run.print_reports = False
    thread = threading.Thread(target=work, name="coordinator", daemon=True)
    thread.start()
    app = CoordinatorApp(source=run.state.snapshot, control=run.control,
                         verify_chain=lambda: verify_chain_message(run.chain))

    def on_sigterm(signum, frame):
        # As the first q: finish the step, write a version, say BYE; the console then leaves.
        # The handler runs on the main thread, which is the app's event loop thread.
        if not app.stopping:
            app.call_later(app.action_request_quit)

    def on_hangup(signum, frame):
        # The terminal closing sends SIGHUP too: then it is the graceful stop, not a reload.
        if terminal_gone(app_tty):
            app.call_later(app.lose_terminal)
        else:
            run.hangup()

    app_tty = terminal_fd()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    previous_hup = signal.signal(signal.SIGHUP, on_hangup)
    try:
        app.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)
        run.control.request_stop()
        # A step finishes in well under this; if the run is stuck the daemon thread dies with us.
        thread.join(30)
    if "error" in status:
        print(f"enshuffle: error: {status['error']}", file=sys.stderr)
    elif thread.is_alive():
        print("enshuffle: the run did not finish its step within 30 s of quitting; leaving anyway",
              file=sys.stderr)
        return 1
    # The console is gone: leave what it showed that matters on the terminal.
    run.print_reports = True
    report_ledger(run.server.ledger, run.settings.json,
                  {"bytes_sent": run.server.bytes_sent, "bytes_received": run.server.bytes_received})
    with run.state.lock:
        final = run.state.status
    for line in run.summary_lines(final):
        eprint(line)
    return status.get("rc", 0)
