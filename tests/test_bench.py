"""`enshuffle bench` in a quick mode (few training images, one repeat, few round trips): every
figure with a target comes out with its value, target and met flag. Real
processes throughout (node processes on loopback, the `enshuffle coordinator` daemon); no figure
is compared with a time here: speed is measured, never asserted by a test.
"""

from __future__ import annotations

import json

from wire_util import enshuffle_cli

# The bench's targets (enshuffle/coordinator/bench.py, TARGET_*), each figure with its target.
TARGET_FIGURES = {
    "coordinator_cpu_vs_cheapest_centralized": 30.0,
    "daemon_cpu_vs_cheapest_centralized": 30.0,
    "wire_over_centralized": 2.0,
    "daemon_wire_over_centralized": 2.0,
    "minibatch_wire_over_centralized": 4.0,
    "minibatch_coordinator_cpu_over_centralized": 2.0,
    "bytes_per_epoch_mb": 200.0,
    "coordinator_cpu_growth_k2_k7": 40.0,
    "minor_faults_per_epoch": 5000.0,
    "node_round_trip_p90_ms": 2.0,
    "node_round_trip_p90_ms_threads1": 2.0,
    "check_share_of_coordinator_cpu": 5.0,
    "check_share_default": 5.0,
    "round_trips_per_default_step": 2.0,
}
# Read from the server and the compute when they count them (server.check_seconds,
# compute.round_trips); "n/a" until then.
HOOKED = {"check_share_of_coordinator_cpu", "check_share_default", "round_trips_per_default_step"}
OTHER_FIGURES = {
    "plan_ms",
    "inprocess_over_centralized",
    "crypto_s_per_epoch",
    "crypto_ms_per_step",
    "privacy_cpu_cost_seed",
    "privacy_cpu_cost_default",
}
# The resident design's targets: the first three from `--scaling`'s rows, the cost model always.
RESIDENT_FIGURES = {
    "resident_deep_cpu_share": 10.0,
    "resident_deep_wall_ratio": 1.5,
    "resident_narrow_cpu_share": 50.0,
    "cost_model_ship_ns": 1.5,
}
QUICK = ("--repeats", "1", "--limit", "500", "--round-trips", "20")


def test_bench_json_has_every_target_figure(core_data_dir, core_cache, tmp_path):
    done = enshuffle_cli(
        "bench", *QUICK, "--data", str(core_data_dir), "--json", home=tmp_path / "home", cache=core_cache, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    figures = report["figures"]
    assert set(TARGET_FIGURES) | OTHER_FIGURES <= set(figures), sorted(figures)
    for name, item in figures.items():
        assert {"value", "target", "op", "met", "unit", "label"} <= set(item), (name, item)
        if item["target"] is None:
            assert item["op"] is None and item["met"] is None, (name, item)
        elif item["value"] is None:
            assert item["met"] is None, (name, item)
        else:
            assert item["op"] in ("<=", ">="), (name, item)
            assert item["met"] is (
                item["value"] <= item["target"] if item["op"] == "<=" else item["value"] >= item["target"]
            ), (name, item)
    for name, target in TARGET_FIGURES.items():
        item = figures[name]
        assert item["target"] == target and item["op"] == "<=", (name, item)
        if name in HOOKED:
            assert item["value"] is not None or item["note"], (name, item)  # n/a says why
        else:
            assert isinstance(item["value"], (int, float)), (name, item)
            assert item["value"] >= 0 or name == "coordinator_cpu_growth_k2_k7", (name, item)
    for name, target in RESIDENT_FIGURES.items():
        item = figures[name]
        assert item["target"] == target and item["op"] == "<=", (name, item)
        if name == "cost_model_ship_ns":
            assert item["value"] > 0 and item["value"] == report["measurements"]["cost_model"]["ship_ns"], item
        else:  # without --scaling: not measured, and the note says what measures it
            assert item["value"] is None and item["met"] is None and "--scaling" in item["note"], (name, item)
    # The raw measurements a script can compare runs with.
    m = report["measurements"]
    assert set(m["centralized_epoch"]) == {"1", "2"} and set(m["centralized_step"]) == {"1", "2"}
    assert m["wire_epoch"]["sent"] > 0 and m["wire_epoch"]["received"] > 0
    assert m["round_trips"]["default"]["count"] == 20 and m["round_trips"]["threads1"]["count"] == 20
    assert m["daemon"]["epochs"] == 2 and m["daemon"]["cpu_seconds_per_epoch"] >= 0
    assert report["settings"]["repeats"] == 1 and report["settings"]["train_images"] == 500


def test_bench_table_without_node_processes(core_data_dir, core_cache, tmp_path):
    done = enshuffle_cli(
        "bench",
        *QUICK,
        "--data",
        str(core_data_dir),
        "--skip-wire",
        home=tmp_path / "home",
        cache=core_cache,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # One line per figure: what was not measured says n/a, the rest no status (no target) or ok/MISSED.
    wire_line = next(line for line in lines if line.startswith("wire epoch / centralized epoch"))
    assert wire_line.split()[-1] == "n/a", wire_line
    plan_line = next(line for line in lines if line.startswith("plan build"))
    assert "ms" in plan_line and "n/a" not in plan_line
    assert any(line.startswith("targets ") for line in lines)


def test_the_resident_targets_read_the_scaling_rows():
    """build_figures takes the resident design's figures from `--scaling`'s rows (784-2048-2048-10
    and 784-128-10 with 2 node processes) and judges each against its target."""
    from enshuffle.coordinator.bench import build_figures

    row = {"central_cpu_ms": 80.0, "central_wall_ms": 50.0, "clear_cpu_ms": 1.0, "privacy_cost": 0.0}
    scaling = [
        {**row, "hidden": "2048-2048", "nodes": 2, "cpu_ms": 6.0, "wall_ms": 90.0, "cpu_share": 7.5, "wall_ratio": 1.8},
        {**row, "hidden": "128", "nodes": 4, "cpu_ms": 1.0, "wall_ms": 1.0, "cpu_share": 1.0, "wall_ratio": 1.0},
        {**row, "hidden": "128", "nodes": 2, "cpu_ms": 2.0, "wall_ms": 9.0, "cpu_share": 60.0, "wall_ratio": 3.0},
    ]
    central = {1: {"cpu": 1.0, "wall": 1.0}, 2: {"cpu": 1.5, "wall": 0.8}}
    m = {
        "centralized_epoch": central,
        "centralized_step": central,
        "inprocess_epoch": {"wall": 1.0},
        "plan_seconds": 0.001,
        "cost_model": {"ship_ns": 1.2, "madd_ns": 0.01},
        "scaling": scaling,
    }
    items = build_figures(m, 1).items
    deep, wall = items["resident_deep_cpu_share"], items["resident_deep_wall_ratio"]
    narrow, ship = items["resident_narrow_cpu_share"], items["cost_model_ship_ns"]
    assert (deep["value"], deep["met"]) == (7.5, True) and "6.00 vs 80.00 ms" in deep["note"], deep
    assert (wall["value"], wall["met"]) == (1.8, False), wall
    assert (narrow["value"], narrow["met"]) == (60.0, False), narrow  # the 2-node row, not the 4-node one
    assert (ship["value"], ship["met"]) == (1.2, True), ship


class _CountingTrainer:
    """A trainer whose steps cost 1 unit of "cpu" each and whose epoch-ending steps (every
    `per_epoch`-th) cost 100 more: what a test pass adds to a mini-batch run's last step."""

    def __init__(self, per_epoch: int):
        self.steps_per_epoch = per_epoch
        self.step = 0
        self.cpu = 0.0
        self.epoch_ends = 0

    def run_step(self):
        self.cpu += 1.0
        self.step += 1
        if self.step >= self.steps_per_epoch:
            self.cpu += 100.0
            self.epoch_ends += 1
            self.step = 0


def test_step_figures_leave_out_the_steps_that_end_an_epoch():
    from enshuffle.coordinator.bench import _steps

    trainer = _CountingTrainer(per_epoch=10)
    rows = _steps(trainer, repeats=3, chunk=8, warmup=3, snap=lambda: {"cpu": trainer.cpu})
    assert trainer.epoch_ends == 2  # steps 10 and 20 of 27 ended epochs, inside measured chunks
    assert [row["cpu"] for row in rows] == [1.0, 1.0, 1.0]


def test_step_figures_of_one_step_epochs_keep_every_step():
    from enshuffle.coordinator.bench import _steps

    trainer = _CountingTrainer(per_epoch=1)
    rows = _steps(trainer, repeats=2, chunk=4, warmup=0, snap=lambda: {"cpu": trainer.cpu})
    assert [row["cpu"] for row in rows] == [101.0, 101.0]
