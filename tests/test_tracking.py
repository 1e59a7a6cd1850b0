"""The run context against a real (temporary) MLflow sqlite store: tags, params, FAILED, signals, races."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest

from sst_lab.redact import REDACTED, redact, redact_text
from sst_lab.tracking.run import TrackingError, config_id, flatten, stage_run
from sst_lab.tracking.study import _wait_group


def _client(uri):
    return mlflow.MlflowClient(tracking_uri=uri)


def _only_run(uri, study):
    client = _client(uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_finished_run_has_tags_params_and_config_artifact(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = {"train": {"lr": 0.1, "targets": ["q_proj", "v_proj"], "seed": 3}, "hub": {"hub_token": "hf_" + "a" * 30}}
    with stage_run(stage="train", study="s1", config=cfg, tags={"role": "utility", "seed": 3, "base_model": "m"},
                   run_name="train-utility", tracking_uri=uri) as run:
        run.log_metrics({"train/loss": 1.5}, step=1)
    r = _only_run(uri, "s1")
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "train-utility"
    t = r.data.tags
    for key in ("stage", "base_model", "role", "sample_size", "seed", "config_id", "git_commit", "git_dirty",
                "version.torch", "version.transformers", "version.peft", "version.trl", "version.mlflow",
                "upstream_run_ids"):
        assert key in t, key
    assert t["stage"] == "train" and t["role"] == "utility" and t["seed"] == "3"
    assert r.data.params["train.lr"] == "0.1"
    assert r.data.params["train.targets"] == '["q_proj", "v_proj"]'
    assert r.data.params["hub.hub_token"] == REDACTED
    assert r.data.metrics["train/loss"] == 1.5
    local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="config/resolved_config.yaml",
                                                tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    text = open(local).read()
    assert "hf_aaaa" not in text and REDACTED in text and "q_proj" in text


def test_config_id_ignores_seed_and_paths_but_not_settings():
    a = {"train": {"lr": 0.1, "seed": 1, "output_dir": "/x/1"}}
    b = {"train": {"lr": 0.1, "seed": 2, "output_dir": "/x/2"}}
    c = {"train": {"lr": 0.2, "seed": 1, "output_dir": "/x/1"}}
    assert config_id(a) == config_id(b) != config_id(c)


def test_flatten_collision_is_an_error():
    with pytest.raises(TrackingError, match="a.b"):
        flatten({"a": {"b": 1}, "a.b": 2})


def test_redaction_of_keys_and_text():
    assert redact({"HF_TOKEN": "abc", "pad_token": "<pad>", "password": "pw"}) == {
        "HF_TOKEN": REDACTED, "pad_token": "<pad>", "password": REDACTED}
    text = redact_text("postgresql://user:s3cret@localhost/db and hf_" + "Z" * 34 + " HF_TOKEN=xyz")
    assert "s3cret" not in text and "ZZZZ" not in text and "xyz" not in text and "user" in text


def test_exception_marks_run_failed_with_error_artifact(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="boom"):
        with stage_run(stage="merge", study="s2", config={"a": 1}, tags={"role": "merged"}, run_name="m",
                       tracking_uri=uri):
            raise ValueError("boom token=hf_" + "b" * 30)
    r = _only_run(uri, "s2")
    assert r.info.status == "FAILED"
    local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="error.txt",
                                                tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    text = open(local).read()
    assert "boom" in text and "bbbbbbbb" not in text
    # reopened and completed (as aggregate reopens its runs): FINISHED without the stale error tag,
    # which is kept as previous_error (before: a FINISHED run still said "error: ... boom")
    with stage_run(stage="merge", study="s2", config={"a": 1}, tags={"role": "merged"}, run_name="m",
                   tracking_uri=uri, resume_run_id=r.info.run_id):
        pass
    again = _only_run(uri, "s2")
    assert again.info.status == "FINISHED" and "error" not in again.data.tags
    assert "boom" in again.data.tags["previous_error"] and "bbbbbbbb" not in again.data.tags["previous_error"]


def test_non_finite_metric_is_refused(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingError, match="finite"):
        with stage_run(stage="evaluate", study="s3", config={}, tags={"role": "base"}, run_name="e",
                       tracking_uri=uri) as run:
            run.log_metrics({"compare/safety_tax": float("inf")})
    assert _only_run(uri, "s3").info.status == "FAILED"


def test_buffered_metrics_keep_their_steps_and_reach_a_failed_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError, match="crash at step 5"):
        with stage_run(stage="train", study="s6", config={}, tags={"role": "utility"}, run_name="t",
                       tracking_uri=uri, metrics_flush_seconds=3600) as run:
            buffer = run.metric_buffer()
            for step in range(1, 6):
                buffer.log({"train/loss": 10.0 / step}, step=step)
            assert _client(uri).get_metric_history(run.run_id, "train/loss") == []  # still in memory
            with pytest.raises(TrackingError, match="finite"):
                buffer.log({"train/loss": float("nan")}, step=6)  # refused at once, not at the flush
            raise RuntimeError("crash at step 5")
    r = _only_run(uri, "s6")
    assert r.info.status == "FAILED"
    history = _client(uri).get_metric_history(r.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 10.0 / s) for s in range(1, 6)]


def test_metric_buffer_flushes_on_its_interval(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with stage_run(stage="train", study="s7", config={}, tags={"role": "utility"}, run_name="t",
                   tracking_uri=uri, metrics_flush_seconds=0) as run:
        buffer = run.metric_buffer()
        buffer.log({"train/loss": 1.0}, step=1)
        assert [m.step for m in _client(uri).get_metric_history(run.run_id, "train/loss")] == [1]


_CHILD = textwrap.dedent("""
    import sys, time
    from sst_lab.tracking.run import stage_run
    with stage_run(stage="train", study=sys.argv[2], config={"x": 1}, tags={"role": "utility"},
                   run_name=sys.argv[3], tracking_uri=sys.argv[1]) as run:
        print("started", flush=True)
        time.sleep(float(sys.argv[4]))
""")


def test_sigterm_marks_run_failed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, uri, "s4", "sleeper", "60"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    r = _only_run(uri, "s4")
    assert r.info.status == "FAILED"
    assert "SIGTERM" in r.data.tags["error"]


def test_parallel_stage_processes_into_a_fresh_store_all_finish(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, uri, "race", f"p{i}", "0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["p0", "p1", "p2", "p3"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_non_main_rank_opens_no_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("RANK", "1")
    with stage_run(stage="train", study="s5", config={}, tags={"role": "utility"}, run_name="r",
                   tracking_uri=uri) as run:
        run.log_metrics({"a": 1.0})
        assert not run.enabled
    assert not (tmp_path / "mlflow.db").exists()


_LOOP_CHILD = textwrap.dedent("""
    import sys
    import mlflow
    from sst_lab.tracking.run import stage_run
    for i in range(10_000):  # most of each cycle is spent inside start_run / end_run
        with stage_run(stage="merge", study=sys.argv[2], config={"i": i}, tags={"role": "merged"},
                       run_name=f"r{i}", tracking_uri=sys.argv[1]) as run:
            run.metric_buffer().log({"m": float(i)}, step=i)  # flushed while the run closes
            mlflow.MlflowClient(sys.argv[1]).get_run(run.run_id)  # a stage's own store read (lineage)
        if i == 0:
            print("ready", flush=True)
""")


def test_sigterm_at_any_moment_never_leaves_a_run_running(tmp_path):
    """SIGTERM landing while a run is being created or ended (not only inside the stage body).

    About a third of the signals land inside a run (the rest in stage_run's set-up: git, store),
    so signals are sent until 4 did (at most 40 attempts); 8 attempts usually suffice."""
    import random

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rng = random.Random(0)
    interrupted: list = []
    for attempt in range(40):
        proc = subprocess.Popen([sys.executable, "-c", _LOOP_CHILD, uri, "loop"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, err
        _wait_group(proc.pid)  # as a sweep does: a helper may record the failure after the stage exited
        client = _client(uri)
        runs = client.search_runs([client.get_experiment_by_name("loop").experiment_id], max_results=50_000)
        assert "RUNNING" not in {r.info.status for r in runs}, (attempt, err[-3000:])
        interrupted = [r for r in runs if r.info.status == "FAILED"]
        assert all("SIGTERM" in r.data.tags["error"] for r in interrupted)
        if len(interrupted) >= 4:
            break
    assert interrupted, "no signal landed inside a run: the test did not exercise the guard"


_LOCKED_CHILD = textwrap.dedent("""
    import sqlite3, sys
    from sst_lab.tracking.run import stage_run
    with stage_run(stage="train", study=sys.argv[2], config={"x": 1}, tags={"role": "utility"},
                   run_name="locked", tracking_uri=sys.argv[1]) as run:
        hold = sqlite3.connect(sys.argv[3])  # stands for a store call interrupted with its lock held
        hold.execute("BEGIN EXCLUSIVE")
        raise RuntimeError("boom while holding a lock")
""")


def test_a_stage_that_cannot_write_its_failure_has_it_recorded_after_exit(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    proc = subprocess.run([sys.executable, "-c", _LOCKED_CHILD, uri, "locked", str(db)], capture_output=True,
                          text=True, timeout=600, start_new_session=True)
    assert proc.returncode != 0 and "boom while holding a lock" in proc.stderr
    assert "recorded FAILED by a helper process" in proc.stderr, proc.stderr[-3000:]
    deadline = time.monotonic() + 300
    while _only_run(uri, "locked").info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    r = _only_run(uri, "locked")
    assert r.info.status == "FAILED" and "boom while holding a lock" in r.data.tags["error"]
    local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="error.txt", tracking_uri=uri,
                                                dst_path=str(tmp_path / "dl"))
    assert "recorded after the stage process exited" in open(local).read()


_SWALLOW_CHILD = textwrap.dedent("""
    import sys, time
    from sst_lab.tracking.run import stage_run

    class SlowFinalizer:
        def __del__(self):  # Python swallows ("Exception ignored in") what a signal handler raises here
            print("in finalizer", flush=True)
            time.sleep(3)

    with stage_run(stage="train", study=sys.argv[2], config={"x": 1}, tags={"role": "utility"},
                   run_name="swallow", tracking_uri=sys.argv[1]) as run:
        obj = SlowFinalizer()
        del obj
        print("stage went on", flush=True)
        time.sleep(float(sys.argv[3]))
""")


@pytest.mark.parametrize("then_sleep, grace, expected_rc", [(0, "60", 1), (600, "2", 128 + signal.SIGTERM)])
def test_sigterm_swallowed_by_a_finalizer_still_fails_the_run(tmp_path, then_sleep, grace, expected_rc):
    """The stage returns after a swallowed signal (FAILED at close), or would go on for 10 minutes
    (the watchdog ends the run FAILED and the process after the grace period)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, SST_LAB_INTERRUPT_GRACE_SECONDS=grace)
    proc = subprocess.Popen([sys.executable, "-c", _SWALLOW_CHILD, uri, "swallow", str(then_sleep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "in finalizer"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert "stage went on" in out and "Exception ignored" in err  # it really was swallowed
    assert proc.returncode == expected_rc, err
    r = _only_run(uri, "swallow")
    assert r.info.status == "FAILED" and "SIGTERM" in r.data.tags["error"]
    assert "swallowed" in r.data.tags["error"]
