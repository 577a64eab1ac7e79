"""`enshuffle node` exits when its run finishes; with --keep-running it stays to wait for the next."""

from __future__ import annotations

from wire_util import InProcessRun, Proc, default_preset, load_inputs, process_env, wait_until


def test_keep_running_outlives_a_finished_run(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 300)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2).start()
    fp = run.identity.fingerprint
    common = ["node", "--connect", run.endpoint, "--coordinator-key", fp, "--threads", "1"]
    leaver = Proc(common + ["--name", "leaver"], process_env(tmp_path / "a"), tmp_path, "leaver")
    stayer = Proc(common + ["--name", "stayer", "--keep-running"], process_env(tmp_path / "b"), tmp_path, "stayer")
    try:
        run.finish(120)
        assert leaver.wait(20) == 0, leaver.describe()
        wait_until(
            lambda: "reconnecting" in stayer.err(),
            20,
            "the staying node to wait for the next run",
            on_timeout=stayer.describe,
        )
        assert stayer.alive(), stayer.describe()
    finally:
        run.close()
        leaver.stop()
        stayer.stop()
