"""A coordinator run over the network: server, trainer, model chain, state.

`CoordinatorRun` is what `enshuffle coordinator` and `enshuffle train --nodes K` (without
`--in-process`) execute. It writes RUN_DIR/run.json (the settings a `--resume` must reuse) and a
model version to RUN_DIR/chain after every epoch or every `--checkpoint-every` steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from enshuffle.blas import BlasThreadsUnavailable, get_blas_threads, set_blas_threads
from enshuffle.coordinator.addresses import PLACEHOLDER
from enshuffle.coordinator.admission import Admission
from enshuffle.coordinator.cluster import local_node_keys
from enshuffle.chain import Chain, ChainError, record_head_in_home, trust_problem
from enshuffle.coordinator.distributed import DistributedCompute, default_disguise
from enshuffle.coordinator.ledger import ExposureLedger, ledger_axes, privacy_notes
from enshuffle.coordinator.offload import default_cost_model
from enshuffle.coordinator.reputation import QUARANTINE_AFTER
from enshuffle.coordinator.report import eprint, join_commands, listen_text, report_epoch, report_ledger, save_weights
from enshuffle.coordinator.server import CoordinatorServer, Listener, ServerConfig, StepAbandoned, TrainingAborted
from enshuffle.coordinator.settings import DEFAULT_BIND, RunConfig, RunRecord
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
    return admission is not None and not admission.open and admission.home is None and admission.allow_file is None


def joining(endpoint: str, fingerprint: str, admission) -> tuple[list[str], list[str], str]:
    """How volunteers join, for the console and the start-up lines: the `enshuffle node` commands
    (with --invite CODE where an invite is how a new key gets in), notes on them, and who may join."""
    if local_only(admission):
        count = len(admission.auto)
        return (
            [],
            [
                f"only the {count} local node process{'es' if count != 1 else ''} this command started "
                f"may join; for volunteers' machines run `enshuffle coordinator`"
            ],
            f"who may join: only this command's {count} local node process{'es' if count != 1 else ''}",
        )
    commands = join_commands(endpoint, fingerprint)
    notes = []
    who = ""
    if admission is not None:
        who = "who may join: " + admission.describe().removeprefix("admission: ")
        if not admission.open and admission.home is not None:
            commands = [f"{c} --invite CODE" for c in commands]
            notes.append(
                "CODE: a fresh one from `enshuffle invite --connect ADDRESS` on this machine"
                + (" (a key in the --allow file needs none)" if admission.allow_file else "")
            )
    if any(PLACEHOLDER in c for c in commands):
        notes.append(f"replace {PLACEHOLDER} with this machine's address as the volunteers reach it")
    elif commands and ("127.0.0.1" in commands[0] or "[::1]" in commands[0]):
        notes.append("a loopback address: only nodes on this machine can connect; bind tcp://0.0.0.0:PORT for others")
    return commands, notes, who


def stamped(line: str) -> None:
    """A headless coordinator's log line, timestamped as a node's are (for a log read hours later)."""
    eprint(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")


def default_run_dir() -> str:
    return os.path.join("runs", time.strftime("run-%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2))


class CoordinatorRun:
    def __init__(
        self,
        config: RunConfig,
        preset,
        inputs,
        *,
        state: CoordinatorState | None = None,
        control: CoordinatorControl | None = None,
        home: Path | None = None,
        quiet: bool = False,
        admission=None,
        command: str = "coordinator",
    ):
        self.config = config
        self.preset = preset
        self.inputs = inputs
        shards, run_dir, resume = config.shards, config.run_dir, config.resume
        serving = config.serving
        self.min_nodes = serving.min_nodes or shards  # unless told: as many nodes as blocks
        self.checkpoint_every = serving.checkpoint_every
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
        # RUN_DIR/run.json; how `enshuffle coordinator` served is kept so --resume serves the same way.
        self.record = RunRecord(
            preset=preset.name,
            epochs=preset.epochs,
            dtype=preset.dtype,
            offload=config.offload,
            seed=preset.seed,
            limit=config.limit,
            shards=shards,
            data=data_fingerprint(inputs),
            layers=tuple(preset.layers),
            activation=preset.activation,
            data_source=config.data_source,
            serving=serving.recorded() if config.keep_serving else None,
        )
        self.admission = admission
        server_config = ServerConfig(
            max_exposure=config.max_exposure,
            replicate=serving.replicate,
            quarantine_after=serving.quarantine_after or QUARANTINE_AFTER,
            log=self._server_log,
        )
        # Bound first: a coordinator that cannot listen leaves no empty run directory behind.
        listener = Listener(serving.bind or DEFAULT_BIND, server_config)
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
        serve = CoordinatorServer.factory(
            listener, self.identity, self.state, ledger, config=server_config, control=self.control, admission=admission
        )
        try:
            self.compute = DistributedCompute(
                inputs.images,
                shards,
                np.random.default_rng(secret),
                serve,
                ledger=ledger,
                **inputs.source(),
                disguise=config.disguise or default_disguise(preset),
                layers=preset.layers,
                offload=config.offload,
                cost_model=default_cost_model(),
            )
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
            st.join_commands, st.join_notes, st.admission = joining(
                self.server.endpoint, self.identity.fingerprint, admission
            )
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
            self.record.save(self.run_dir)  # a new --epochs is kept
        self._steps_since_version = 0
        self._step_time_total, self._steps_timed = 0.0, 0

    def _check_run_dir(self, resume: bool) -> None:
        """Refuse what would mix two runs in one chain, before anything is started."""
        assert self.run_dir is not None and self.chain is not None  # called only with a run directory
        head_file = self.run_dir / "chain" / "HEAD"
        if not resume and head_file.exists():
            raise UsageError(
                f"{self.run_dir} already holds a model chain: continue it with --resume "
                f"(and --epochs N to extend it), or choose a new --out"
            )
        if resume:
            try:
                key = self.chain.run_key() if (self.run_dir / "chain").exists() else None
            except ChainError as exc:
                raise UsageError(f"cannot resume from {self.run_dir}: {exc}") from None
            if key is not None and key != self.identity.public_hex:
                raise UsageError(
                    f"{self.run_dir} was signed by coordinator key {fingerprint(bytes.fromhex(key))}, "
                    f"but this machine's key is {self.identity.fingerprint}: "
                    f"resume with the ENSHUFFLE_HOME that ran it"
                )
            stored = RunRecord.load(self.run_dir).data
            current = self.record.data
            assert current is not None  # the data's fingerprint, taken above
            if stored is not None and stored != current:
                raise UsageError(
                    f"{self.run_dir} was trained on other data ({stored.get('images')} training "
                    f"images, digest {str(stored.get('sha256'))[:12]}) than now "
                    f"({current['images']}, {current['sha256'][:12]}): "
                    f"resume with the same --data and --limit"
                )
        # A directory this run creates and never writes a version to is removed at the end.
        self._created_run_dir = not resume and not self.run_dir.exists()
        try:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            make_private(self.run_dir)
        except OSError as exc:
            raise UsageError(
                f"cannot create run directory {self.run_dir}: {exc.strerror}; choose a writable --out"
            ) from None

    # -- resume ----------------------------------------------------------------------
    def _resume(self) -> None:
        assert self.run_dir is not None and self.chain is not None  # called only with a run directory
        head = self.chain.head()
        if head is None:
            raise UsageError(
                f"{self.run_dir}: nothing to resume (no model version in {self.run_dir / 'chain'}); "
                f"start without --resume"
            )
        # Every version, not only the head: a run continued from a damaged chain would sign onto it.
        report = self.chain.verify(self.identity.fingerprint)
        if not report.ok:
            where = f" at version {report.first_bad[:12]}" if report.first_bad else ""
            raise UsageError(
                f"cannot resume {self.run_dir}: its chain fails verification{where}: {report.problem}; "
                f"see `enshuffle chain verify {self.run_dir}`, restore the run directory from a copy, "
                f"or start a new run"
            )
        # And what `chain verify` checks of the head: every version signed by this coordinator's
        # key, and a head log that matches the head this machine recorded (a rolled-back HEAD).
        problem = trust_problem(
            self.chain, self.identity.fingerprint, self.home if self.home is not None else enshuffle_home()
        )
        if problem is not None:
            raise UsageError(
                f"cannot resume from {self.run_dir}: {problem}; `enshuffle chain verify {self.run_dir}` shows the same"
            )
        arrays, meta = self.chain.load(head)
        try:
            self.trainer.restore(arrays, meta)
        except ValueError as exc:
            raise UsageError(f"cannot resume {self.run_dir} from version {head[:12]}: {exc}") from None
        if self.trainer.finished:
            raise UsageError(
                f"{self.run_dir} has finished: its head version {head[:12]} is epoch {self.trainer.epoch} of "
                f"{self.preset.epochs}, so there is nothing to resume. To train further, extend it: "
                f"`enshuffle {self.command} --out {self.run_dir} --resume --epochs N` with N > {self.preset.epochs}"
            )
        if meta.get("epochs_total") not in (None, self.preset.epochs):
            replace(RunRecord.load(self.run_dir), epochs=self.preset.epochs).save(self.run_dir)
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
        meta.update(
            {
                "run_id": self.server.run_id,
                "created": time.time(),
                "settings": self.record.to_json(),
                "metrics": (
                    {
                        "cost": last["cost"],
                        "train_accuracy": last["train_accuracy"],
                        "test_accuracy": last["test_accuracy"],
                    }
                    if last
                    else {}
                ),
                "exposure": self.server.ledger.shares(),
                "exposure_forms": self.server.ledger.forms(),
                "exposure_bound": self.server.bound,
                "privacy_notes": self.privacy_notes(),
                "ledger": self.server.ledger.export(),
                "history": history,
                "labels": {key.hex(): label for key, label in self.server.labels.items()},
            }
        )
        for attempt in range(CHAIN_WRITE_ATTEMPTS):
            try:
                version = self.chain.append(arrays, meta)
                record_head_in_home(self.chain, self.home if self.home is not None else enshuffle_home())
                break
            except OSError as exc:  # e.g. out of file descriptors or disk space for a moment
                # An append that failed leaves the head where it was (what it wrote is cleaned up by
                # the next one): training goes on, and the next version (or this one again) retries.
                again = attempt + 1 < CHAIN_WRITE_ATTEMPTS
                self.log(
                    f"could not write a model version to {self.chain.dir if self.chain else 'the chain'} "
                    f"({exc.strerror or exc}); "
                    f"{'trying again' if again else 'training goes on; the next version retries'}"
                )
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
            if not self.server.wait_for_nodes(
                self.min_nodes, lambda: self.control.stop_requested, give_up=self.give_up
            ):
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
                        report_epoch(report, self.config.json, self.preset.epochs)
                    self.write_version(report)
                elif self.checkpoint_every and self._steps_since_version >= self.checkpoint_every:
                    self.write_version()
            if self.control.stop_requested and self._steps_since_version:
                self.write_version()
                self.log("stopped on request after finishing the step; model version written")
            elif self.control.stop_requested:  # it came while the last model version was written
                self.log("stopped: on request; the last model version is the place to --resume from")
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
        if self.config.save_weights:
            save_weights(self.config.save_weights, self.trainer.params)
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
            report_ledger(
                self.server.ledger,
                self.config.json,
                {"bytes_sent": self.server.bytes_sent, "bytes_received": self.server.bytes_received},
                notes=self.privacy_notes(),
            )
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
        lines = [
            f"run {status}: epoch {self.trainer.epoch}/{self.preset.epochs}, step {self.trainer.step}"
            + (f", test accuracy {last.test_accuracy:.4f}" if last else "")
        ]
        if self.run_dir and head:
            lines.append(
                f"model chain: {self.run_dir} (head {head[:12]}); check it with `enshuffle chain verify {self.run_dir}`"
            )
            command = self.command
            if status == "finished":
                lines.append(
                    f"to train further: enshuffle {command} --out {self.run_dir} --resume "
                    f"--epochs {self.preset.epochs + 5}"
                )
            else:
                lines.append(f"to continue: enshuffle {command} --out {self.run_dir} --resume")
        elif self.run_dir:
            lines.append(
                f"no model version was written to {self.run_dir}"
                + ("; the empty run directory was removed" if getattr(self, "run_dir_removed", False) else "")
            )
        if self.config.save_weights and status == "finished":
            lines.append(f"weights written to {self.config.save_weights}")
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
        raise UsageError(
            f"{path} is unreadable ({exc}); it holds the run's plan secret: restore it from a "
            f"backup, or start a new run"
        ) from None
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return int(value, 16)


def _version_row(version_id: str, parent_id: str | None, meta: dict) -> VersionRow:
    return VersionRow(
        version_id=version_id,
        parent_id=parent_id,
        epoch=int(meta.get("epoch", 0)),
        step=int(meta.get("step", 0)),
        test_accuracy=(meta.get("metrics") or {}).get("test_accuracy"),
        created=float(meta.get("created", 0.0)),
        metadata={k: v for k, v in meta.items() if k not in ("ledger", "history", "labels")},
    )


# -- a run with local node processes -------------------------------------------------------


def local_cluster_run(config: RunConfig, preset, inputs, *, workdir: Path, quiet: bool = True) -> CoordinatorRun:
    """The coordinator of `enshuffle train --nodes K` (K: `config.shards`), on loopback, admitting
    only the K local node keys it creates in `workdir` (nothing to set up, nobody else joins)."""
    nodes, run_dir = config.shards, config.run_dir
    admission = Admission(auto=set())
    # A kept chain (--out) is signed with this machine's coordinator key, so that --resume,
    # which checks the key, can continue it; a throw-away run uses a throw-away key.
    run = CoordinatorRun(
        replace(config, serving=replace(config.serving, bind="tcp://127.0.0.1:*", min_nodes=nodes)),
        preset,
        inputs,
        home=None if run_dir else workdir / "coordinator",
        quiet=quiet,
        admission=admission,
        command="train",
    )
    # The local nodes' keys are made once the run directory is accepted, in it when there is one:
    # a resumed run's local nodes are the same nodes (the same ledger rows), not new ones.
    for key in local_node_keys(local_nodes_dir(run_dir, workdir), nodes):
        admission.admit_key(key)
    with run.state.lock:
        st = run.state
        st.join_commands, st.join_notes, st.admission = joining(
            run.server.endpoint, run.identity.fingerprint, admission
        )
    return run


def local_nodes_dir(run_dir: str | None, workdir: Path) -> Path:
    """Where `enshuffle train`'s local nodes keep their homes: in the run directory when kept."""
    return Path(run_dir) / "local-nodes" if run_dir else workdir


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
