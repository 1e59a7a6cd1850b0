"""Two sweeps of one study at once: nodes are claimed, never run twice; stale claims are detected;
aggregation keeps the run the planner reuses when a node was run twice anyway.

Uses the fake stages of tests/test_study.py (real sweeps, real child processes, a real sqlite store).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import mlflow

from sst_lab.tracking import study as st
from sst_lab.tracking.aggregation import DUPLICATE_RULE, write_aggregates
from sst_lab.tracking.run import ensure_experiment, stage_run
from test_study import fake_study, fakes, finished_per_node, run_sweep, study_runs  # noqa: F401 - fixture

NODES = 9  # 1 size x 1 seed x 1 method


def test_two_sweeps_at_once_run_every_node_once(fakes, tmp_path):  # noqa: F811 - the fixture
    """The race is made certain, not timed: the first sweep's nodes are held at a gate until the
    second sweep has printed that it waits for one of them (CI once lost the race on a slow machine)."""
    uri, gate, log = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "gate", tmp_path / "second.log"
    study = fake_study(fakes, tmp_path / "study.yaml", name="twice", seeds=(1,), methods=("a",))
    ensure_experiment(uri, "twice")  # both sweeps find the store ready
    procs = [run_sweep(study, uri, fakes, "--workers", "2", env={"FAKE_GATE": str(gate)}, background=True)]
    try:
        while "RUNNING" not in {r.info.status for r in study_runs(uri, "twice")}:  # the second plans while
            time.sleep(0.2)                                                         # the first runs a node
            assert procs[0].poll() is None, procs[0].stdout.read()
        procs.append(run_sweep(study, uri, fakes, "--workers", "2", env={"PYTHONUNBUFFERED": "1"},
                               background=True, log=log))
        while "[sweep] wait " not in log.read_text():  # it found the first sweep's claim
            time.sleep(0.2)
            assert procs[1].poll() is None, log.read_text()
    finally:
        gate.touch()
    outs = [procs[0].communicate()[0], (procs[1].wait(), log.read_text())[1]]
    assert [p.returncode for p in procs] == [0, 0], outs
    per_node = finished_per_node(study_runs(uri, "twice"))
    assert len(per_node) == NODES and set(per_node.values()) == {1}, per_node  # before: 2 runs per node
    assert sum(o.count("[sweep] start ") for o in outs) == NODES
    assert "was run by another sweep" in outs[1], outs[1]  # what it waited for, it reused
    claims = study_runs(uri, st.claims_experiment("twice"))
    assert claims and "RUNNING" not in {r.info.status for r in claims}  # every claim was released


def _node(fakes, tmp_path):  # noqa: F811 - the fixture
    study = st.load_study(fake_study(fakes, tmp_path / "study.yaml", name="claims", seeds=(1,), methods=("a",)))
    return st.expand(study)[0]


def test_a_live_claim_holds_a_node_and_a_stale_one_does_not(fakes, tmp_path, monkeypatch):  # noqa: F811
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    node, store = _node(fakes, tmp_path), st.Store(uri, "claims")
    first, second = st.Claims(store, "sweep-1"), st.Claims(store, "sweep-2")
    try:
        assert first.acquire(node) == ""
        assert "sweep sweep-1" in second.acquire(node)  # held by a live sweep: the second must wait
        first.close()  # an interrupted sweep's claims end KILLED
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        client = mlflow.MlflowClient(tracking_uri=uri)
        for host, pid, beat in ((first.host, str(dead.pid), time.time()), ("other-host", "1", time.time() - 3600)):
            client.create_run(second.experiment_id, tags={"sweep.key": node.key, "sweep.seed": str(node.seed),
                                                          "sweep.id": "killed", "host": host, "pid": pid,
                                                          "claim.heartbeat": str(beat)})
        assert second.acquire(node) == ""  # both leftovers are stale
        ended = {r.data.tags["host"]: r for r in client.search_runs([second.experiment_id])
                 if r.data.tags.get("sweep.id") == "killed"}
        assert {r.info.status for r in ended.values()} == {"FAILED"}
        assert "is gone" in ended[first.host].data.tags["error"]
        assert "no heartbeat for" in ended["other-host"].data.tags["error"]
    finally:
        first.close()
        second.close()


def test_aggregate_counts_the_run_the_planner_reuses(tmp_path, monkeypatch):
    uri, echoed = f"sqlite:///{tmp_path}/mlflow.db", []
    monkeypatch.setenv("SST_LAB_RUN_TAGS", json.dumps({"sweep.key": "k1", "sweep.seed": "1"}))
    ids = []
    for value in (0.25, 0.75):  # the same node and seed, FINISHED twice with different results
        with stage_run(stage="evaluate", study="dups", config={"e": 1}, tags={"role": "merged", "seed": 1},
                       run_name="e", tracking_uri=uri) as run:
            run.log_metrics({"safety/x/refusal_rate": value})
        ids.append(run.run_id)
        time.sleep(0.01)
    reused = st.Store(uri, "dups").attempts()[("k1", "1")]
    planner = [a for a in reused if a.status == "FINISHED"][0].run_id
    [(group, agg_id)] = write_aggregates("dups", uri, echo=echoed.append)
    assert planner == ids[0] and [m.run_id for m in group.members] == [ids[0]]  # before: the latest counted
    agg = mlflow.MlflowClient(tracking_uri=uri).get_run(agg_id)
    assert agg.data.metrics["safety/x/refusal_rate/mean"] == 0.25
    assert agg.data.tags["aggregate.ignored_run_ids"] == ids[1]
    assert agg.data.tags["aggregate.duplicate_rule"] == DUPLICATE_RULE
    assert any(ids[1] in line and "duplicate" in line for line in echoed), echoed
