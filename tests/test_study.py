"""Studies: grid, plan, reuse, resume, failure policy, workers, Slurm, aggregation and report.

Most tests run the real sweep machinery (real child processes, a real MLflow store, the real
``stage_run``) on *fake* stage scripts that start in a second and log deterministic numbers; the
last group runs a cut-down tiny-world study (18 stage runs) with the real stages end to end, killed once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from scipy import stats as sps

from conftest import REPO, stage_env
from sst_lab.config import ConfigError
from sst_lab.tracking import study as st
from sst_lab.tracking.aggregation import SKIP_METRIC, metric_range, write_aggregates
from sst_lab.tracking.reporting import interval_text
from sst_lab.tracking.run import ensure_experiment, stage_run

# ------------------------------------------------------------------------------ fake stages
FAKE_STAGE = textwrap.dedent('''
    """A stand-in stage: parses --key value args, logs deterministic metrics, prints run_id.

    The one fake of the sweep tests (test_study, test_selection, test_concurrent_sweeps, test_postgres).
    """
    import hashlib, json, os, sys, time
    from pathlib import Path
    import mlflow
    from sst_lab.config import merge_config_files
    from sst_lab.tracking.run import ensure_experiment, stage_run

    stage = Path(sys.argv[0]).stem
    args, key = {}, None
    for a in sys.argv[1:]:
        if a.startswith("--"):
            key = a[2:]
            args.setdefault(key, [])
        else:
            args[key].append(a)
    args = {k: " ".join(v) for k, v in args.items()}
    configs = [p for p in sys.argv[1:] if p.endswith(".yaml")]
    cfg = {**merge_config_files(configs), **{k: v for k, v in args.items() if k != "config"}}
    client = mlflow.MlflowClient()
    for_id = dict(cfg)
    ups = []
    for flag in ("utility_adapter", "safety_adapter", "adapter", "candidate", "reference"):
        if flag in cfg:
            up = client.get_run(cfg[flag])
            assert up.info.status == "FINISHED", up.info.status
            for_id[flag] = "config:" + up.data.tags["config_id"]
            ups.append(cfg[flag])
    node = json.loads(os.environ.get("SST_LAB_RUN_TAGS", "{}")).get("sweep.node", "")
    seed = int(cfg["seed"])
    role = {"train": cfg.get("role", "utility"), "merge": "merged", "compare": "compare"}.get(stage, "x")
    extra = {"merge_method": cfg["method"]} if stage == "merge" else {}
    if stage == "evaluate":  # the split it scored and the role of the adapter it scored, as evaluate tags them
        up = client.get_run(cfg["adapter"]) if "adapter" in cfg else None
        role = up.data.tags["role"] if up else "base"
        extra = {"split": cfg.get("split", "all"), "adapter_run_id": cfg.get("adapter", "none")}
    if stage == "compare":  # the runs it compared, as compare tags them
        extra = {"candidate_run_id": cfg["candidate"], "reference_run_id": cfg["reference"]}
    with stage_run(stage=stage, study=cfg["study"], config={"fake": cfg}, config_for_id={"fake": for_id},
                   tags={"role": role, "seed": seed, "upstream_run_ids": ",".join(ups) or "none", **extra},
                   run_name=node or stage) as run:
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
        while os.environ.get("FAKE_GATE") and not os.path.exists(os.environ["FAKE_GATE"]):
            time.sleep(0.1)  # held until the test opens the gate (a race made certain, not timed)
        while os.environ.get("FAKE_HOLD") and os.environ["FAKE_HOLD"] in node:
            time.sleep(0.1)  # this node runs until it is killed
        if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in node:
            raise RuntimeError("fake failure of " + node)
        h = lambda s: int(hashlib.sha256(f"{s}{run.tags['config_id']}{seed}".encode()).hexdigest()[:8], 16) / 16**8
        if stage == "evaluate":
            run.log_metrics({"safety/harm/refusal_rate": h("s") * 0.5 + 0.05 * seed,
                             "safety/harm/refusal_rate_ci_low": 0.0, "safety/harm/n": 50,
                             "overrefusal/xs/compliance_rate_safe": h("o"),
                             "utility/task/exact_match": 0.9 - 0.2 * h("u") + 0.01 * seed,
                             "utility/mmlu/accuracy": 0.25})
        elif stage == "compare":
            run.log_metrics({"compare/safety_gain": h("g") + 0.1 * seed, "compare/utility_loss": h("l") * 0.1,
                             "compare/safety_tax": h("t") + 0.02 * seed, "compare/safety_p_value": 0.01})
            run.set_tags({"compare/safety_tax_status": "defined"})
        elif stage == "merge":
            ev = sorted([h(str(i)) * 10 ** (-i / 4) for i in range(16)], reverse=True)
            run.log_json({"method": cfg["method"], "modules": {"layers.0.q_proj": {"eigenvalues": ev, "k": 4},
                                                               "layers.0.v_proj": {"eigenvalues": ev[::-1][::-1], "k": 4}}},
                         "merge_report.json")
            run.log_metrics({"merge/kept_fraction/mean": h("k")})
        else:
            run.log_metrics({"train/loss": h("loss") + seed})
    print(f"run_id: {run.run_id}")
''')


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict:
    return write_fake_stages(tmp_path_factory.mktemp("fake_stages"))


def write_fake_stages(d: Path) -> dict:
    """A fake script per stage (FAKE_STAGE) and the configs a fake study names, in folder ``d``."""
    for stage in st.PIPELINE:
        (d / f"{stage}.py").write_text(FAKE_STAGE)
    (d / "model.yaml").write_text("model_name_or_path: fake-org/fake-model\n")
    (d / "utility.yaml").write_text("role: utility\n")
    (d / "safety.yaml").write_text("role: safety\n")
    return {"dir": d, "specs": {s: st.StageSpec(str(d / f"{s}.py"), st.STAGE_SPECS[s].output_dir) for s in st.PIPELINE}}


def fake_study(fakes, path: Path, *, name: str, sizes=(16,), seeds=(1, 2), methods=("a", "b"), **extra) -> Path:
    d = fakes["dir"]
    data = {"name": name, "models": [{"name": "fake", "configs": [str(d / "model.yaml")]}],
            "sample_sizes": list(sizes), "seeds": list(seeds),
            "train": {"utility": [str(d / "utility.yaml")], "safety": [str(d / "safety.yaml")],
                      "accelerate_config": None},
            "merge": {"methods": [{"name": m, "method": "sst", "args": {"k": i}} for i, m in enumerate(methods)]},
            "evaluate": {"args": {"preset": "minimal"}}, "compare": {"args": {"n_boot": 10}},
            "report": {"safety_metric": "safety/harm/refusal_rate"}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def run_sweep(study_file: Path, uri: str, fakes, *extra: str, env: dict | None = None,
              background: bool = False, log: Path | None = None):
    """tracking/sweep.py's main in a child process, with the fake stage scripts swapped in. In the
    background its output goes to a pipe, or to the file ``log`` (to be read while it runs)."""
    code = ("import sys; from sst_lab.tracking import study as st; from sst_lab.tracking.sweep import main\n"
            f"st.STAGE_SPECS.update({{k: st.StageSpec(*v) for k, v in {_spec_args(fakes)!r}.items()}})\n"
            "sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "--config", str(study_file), "--tracking_uri", uri,
           "--output_root", str(study_file.parent / "outputs"), *extra]
    full_env = {**stage_env(), **(env or {})}
    if background:
        if log is None:
            return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        with open(log, "w") as out:  # the child keeps its own copy of the file
            return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=1800)


def _spec_args(fakes) -> dict:
    return {k: (v.script, v.output_dir) for k, v in fakes["specs"].items()}


def study_runs(uri: str, study: str, stage: str | None = None) -> list:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    return [r for r in runs if stage is None or r.data.tags.get("stage") == stage]


def finished_per_node(runs) -> dict:
    out: dict = {}
    for r in runs:
        if r.info.status == "FINISHED" and "sweep.key" in r.data.tags:
            k = (r.data.tags["sweep.key"], r.data.tags["sweep.seed"])
            out[k] = out.get(k, 0) + 1
    return out


# ------------------------------------------------------------------------------------ grid
def test_tiny_study_grid():
    study = st.load_study(REPO / "configs/studies/tiny.yaml")
    nodes = st.expand(study)
    by_stage = {s: [n for n in nodes if n.stage == s] for s in st.PIPELINE}
    # 2 sizes x 2 seeds x 2 roles; x 2 methods; base per seed + 2 roles x 4 + merged x 8; merged-vs-utility + safety-vs-base
    assert [len(by_stage[s]) for s in st.PIPELINE] == [8, 8, 2 + 4 + 4 + 8, 8 + 4]
    assert len({n.id for n in nodes}) == len(nodes)
    seen = set()
    for n in nodes:  # dependency order, upstreams of the right stage
        assert set(n.upstream.values()) <= seen, n.id
        seen.add(n.id)
    ids = {n.id: n for n in nodes}
    merge = ids["merge-sst-k16-tiny-world-n100-s1"]
    assert merge.args["method"] == "sst" and merge.args["k"] == 16
    assert merge.upstream == {"utility_adapter": "train-utility-tiny-world-n100-s1",
                              "safety_adapter": "train-safety-tiny-world-n100-s1"}
    cmp_ = ids["compare-merged-sst-k16-vs-utility-tiny-world-n100-s1"]
    assert cmp_.upstream == {"candidate": "evaluate-merged-sst-k16-tiny-world-n100-s1",
                             "reference": "evaluate-utility-tiny-world-n100-s1"}
    assert ids["compare-safety-vs-base-tiny-world-n400-s2"].upstream["reference"] == "evaluate-base-tiny-world-s2"
    # keys: seed-free, config-sensitive, and carried through the lineage
    assert ids["train-utility-tiny-world-n100-s1"].key == ids["train-utility-tiny-world-n100-s2"].key
    assert ids["train-utility-tiny-world-n100-s1"].key != ids["train-utility-tiny-world-n400-s1"].key
    assert ids["merge-sst-k16-tiny-world-n100-s1"].key != ids["merge-ties-d0.5-tiny-world-n100-s1"].key
    assert ids["evaluate-merged-sst-k16-tiny-world-n100-s2"].key == ids["evaluate-merged-sst-k16-tiny-world-n100-s1"].key
    train = ids["train-safety-tiny-world-n400-s2"]
    cmd = st.command(train, {}, output_dir="/o", study="tiny", python="py")
    assert cmd[:5] == ["py", "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml"]
    assert cmd[5] == "train/sft.py" and "--sample_size" in cmd and cmd[cmd.index("--seed") + 1] == "2"
    assert "--tracking_uri" not in cmd  # the URI (maybe with a password) travels in the environment


@pytest.mark.parametrize("path", sorted((REPO / "configs/studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_study_config_loads_and_expands(path):
    study = st.load_study(path)
    nodes = st.expand(study)
    n_models, n_sizes, n_seeds = len(study.models), len(study.sample_sizes), len(study.seeds)
    assert sum(n.stage == "train" for n in nodes) == 2 * n_models * n_sizes * n_seeds
    assert sum(n.stage == "merge" for n in nodes) == len(study.merge.methods) * n_models * n_sizes * n_seeds
    if path.name == "original-3models.yaml":  # the GPU study: three models, 3+ seeds
        assert {m.name for m in study.models} == {"mistral-7b", "llama-3.1-8b", "qwen2.5-14b"}
        assert len(study.seeds) >= 3 and len(nodes) == 468


def test_study_config_errors_name_the_field(tmp_path, fakes):
    base = yaml.safe_load(fake_study(fakes, tmp_path / "s.yaml", name="x").read_text())
    cases = [({"sample_sizse": [1]}, "unknown key"), ({"seeds": [1, 1]}, "distinct"),
             ({"train": {**base["train"], "args": {"seed": 3}}}, "sets ['seed']"),
             ({"merge": {"methods": [{"name": "a", "method": "x"}, {"name": "a", "method": "y"}]}}, "distinct names"),
             ({"evaluate": {"configs": ["configs/evaluate/nope.yaml"]}}, "does not exist"),
             ({"compare": {"pairs": [["utility", "merged"]]}}, "reference not merged"),
             ({"on_failure": "retry"}, "on_failure")]
    for change, message in cases:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            st.load_study(tmp_path / "bad.yaml")


def test_plan_reuses_finished_reruns_failed_and_handles_running():
    study_nodes = [st.Node("a", "train", "utility", "m", 1, 8, None, [], {}, {}, key="k1"),
                   st.Node("b", "merge", "merged", "m", 1, 8, "x", [], {}, {"utility_adapter": "a"}, key="k2"),
                   st.Node("c", "evaluate", "merged", "m", 1, 8, "x", [], {}, {"adapter": "b"}, key="k3")]
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def att(rid, status, h=host, pid=str(dead.pid)):
        return st.Attempt(rid, status, "cid", h, pid, 0)

    plan = st.make_plan(study_nodes, {("k1", "1"): [att("r0", "FAILED"), att("r1", "FINISHED")],
                                      ("k2", "1"): [att("r2", "RUNNING")]})
    assert [(s.action, s.run_id) for s in plan] == [("reuse", "r1"), ("run", None), ("run", None)]
    assert [a.run_id for a in plan[1].stale] == ["r2"]  # same host, dead pid: abandoned
    plan = st.make_plan(study_nodes, {("k2", "1"): [att("r2", "RUNNING", h="other-host")]})
    assert [s.action for s in plan] == ["run", "elsewhere", "blocked"]
    plan = st.make_plan(study_nodes, {("k2", "1"): [att("r2", "RUNNING", h="other-host")]}, rerun_running=True)
    assert [s.action for s in plan] == ["run", "run", "run"] and plan[1].stale
    plan = st.make_plan(study_nodes, {}, stages={"train"})
    assert [s.action for s in plan] == ["run", "blocked", "blocked"]


def test_env_tags_and_reopening_a_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("SST_LAB_RUN_TAGS", json.dumps({"sweep.key": "abc", "stage": "not-this"}))
    with stage_run(stage="aggregate", study="s", config={"a": 1}, tags={"role": "r"}, run_name="x",
                   tracking_uri=uri) as run:
        run.log_metrics({"m": 1.0})
    monkeypatch.delenv("SST_LAB_RUN_TAGS")
    with stage_run(stage="aggregate", study="s", config={"a": 1}, tags={"role": "r", "extra": "1"}, run_name="x",
                   tracking_uri=uri, resume_run_id=run.run_id) as again:
        again.log_metrics({"m": 2.0})
    runs = study_runs(uri, "s")
    assert len(runs) == 1 and again.run_id == run.run_id
    t = runs[0].data.tags
    assert t["sweep.key"] == "abc" and t["stage"] == "aggregate" and t["extra"] == "1"
    assert t["host"] == socket.gethostname() and runs[0].data.metrics["m"] == 2.0
    assert runs[0].info.status == "FINISHED"


# ------------------------------------------------------------------------- fake sweeps
@pytest.fixture(scope="module")
def fake_sweep(fakes, tmp_path_factory):
    """A fake study (1 size x 2 seeds x 2 methods = 24 nodes) swept once with 3 workers, then again."""
    d = tmp_path_factory.mktemp("fake_sweep")
    uri = f"sqlite:///{d}/mlflow.db"
    study = fake_study(fakes, d / "study.yaml", name="fake")
    first = run_sweep(study, uri, fakes, "--workers", "3")
    second = run_sweep(study, uri, fakes, "--workers", "3")
    return {"uri": uri, "study": study, "first": first, "second": second, "dir": d}


def test_sweep_runs_everything_then_reuses_everything(fake_sweep):
    first, second, uri = fake_sweep["first"], fake_sweep["second"], fake_sweep["uri"]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "24 finished" in first.stdout, first.stdout
    assert second.returncode == 0 and "24 reused" in second.stdout, second.stdout
    runs = study_runs(uri, "fake")
    assert len(runs) == 24 and {r.info.status for r in runs} == {"FINISHED"}
    assert set(finished_per_node(runs).values()) == {1}
    by_node = {r.data.tags["sweep.node"]: r for r in runs}
    merge = by_node["merge-a-fake-n16-s2"]
    ups = {by_node["train-utility-fake-n16-s2"].info.run_id, by_node["train-safety-fake-n16-s2"].info.run_id}
    assert set(merge.data.tags["upstream_run_ids"].split(",")) == ups  # wired by run id
    assert merge.data.params["fake.method"] == "sst" and merge.data.params["fake.k"] == "0"
    # seeds of one node share the stage's config_id (what aggregation groups by)
    assert by_node["merge-a-fake-n16-s1"].data.tags["config_id"] == merge.data.tags["config_id"]
    # parallel: a second stage process was started before the first one had finished (read from the
    # sweep's own log, not from run times, which depend on how fast each child imports MLflow)
    events = re.findall(r"\[sweep\] (start|finished) ", first.stdout)
    assert events[:2] == ["start", "start"], first.stdout
    summary = json.loads(Path(first.stdout.split("summary: ")[1].strip()).read_text())
    assert len(summary["outcomes"]) == 24


def test_dry_run_prints_the_plan_and_creates_nothing(fake_sweep, fakes, tmp_path):
    proc = run_sweep(fake_sweep["study"], fake_sweep["uri"], fakes, "--dry-run")
    assert proc.returncode == 0 and "plan: 24 reuse, 0 run" in proc.stdout
    fresh = f"sqlite:///{tmp_path}/fresh.db"
    proc = run_sweep(fake_sweep["study"], fresh, fakes, "--dry-run")
    assert "plan: 0 reuse, 24 run" in proc.stdout and "--utility_adapter '<run id of train-utility" in proc.stdout
    assert not (tmp_path / "fresh.db").exists()


def test_failure_stop_then_continue_then_resume(fakes, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = fake_study(fakes, tmp_path / "study.yaml", name="failing", seeds=(1,))
    stop = run_sweep(study, uri, fakes, "--workers", "1", env={"FAKE_FAIL": "merge-a-"})
    assert stop.returncode == 1 and "failed: merge-a-fake-n16-s1" in stop.stdout, stop.stdout
    assert "fake failure of merge-a-fake-n16-s1" in stop.stdout
    n_stop = len(study_runs(uri, "failing"))
    cont = run_sweep(study, uri, fakes, "--workers", "2", "--on_failure", "continue", env={"FAKE_FAIL": "merge-a-"})
    assert cont.returncode == 1
    blocked = set(re.findall(r"blocked: ([^\s:]+)", cont.stdout))
    assert blocked == {"evaluate-merged-a-fake-n16-s1", "compare-merged-a-vs-utility-fake-n16-s1"}, cont.stdout
    runs = study_runs(uri, "failing")
    assert sum(r.info.status == "FAILED" for r in runs) == 2 and len(runs) > n_stop
    done = run_sweep(study, uri, fakes)
    assert done.returncode == 0 and "3 finished" in done.stdout and "9 reused" in done.stdout, done.stdout
    assert set(finished_per_node(study_runs(uri, "failing")).values()) == {1}


def test_killed_sweep_resumes_without_duplicates(fakes, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = fake_study(fakes, tmp_path / "study.yaml", name="killed", seeds=(1,), methods=("a",))
    ensure_experiment(uri, "killed")  # the store exists before this test polls it
    proc = run_sweep(study, uri, fakes, "--workers", "2", env={"FAKE_HOLD": "merge-a-"}, background=True)
    while True:  # kill it once two stages finished and the merge (held until killed) is running
        time.sleep(0.5)
        runs = study_runs(uri, "killed")
        held = [r for r in runs if r.data.tags.get("sweep.node", "").startswith("merge-a-")]
        if [r.info.status for r in runs].count("FINISHED") >= 2 and held and held[0].info.status == "RUNNING":
            break
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)  # the sweep forwards it to its running stages
    out, _ = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, out
    runs = study_runs(uri, "killed")
    assert "RUNNING" not in {r.info.status for r in runs}  # the running stages ended FAILED, not orphaned
    interrupted = [r for r in runs if r.info.status == "FAILED"]
    assert interrupted and all("SIGTERM" in r.data.tags.get("error", "") for r in interrupted)
    resumed = run_sweep(study, uri, fakes)
    assert resumed.returncode == 0, resumed.stdout
    runs = study_runs(uri, "killed")
    assert set(finished_per_node(runs).values()) == {1} and len(finished_per_node(runs)) == 9


def test_slurm_jobs_chain_and_run_through_node_mode(fakes, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = fake_study(fakes, tmp_path / "study.yaml", name="slurm", seeds=(1,), methods=("a",),
                       slurm={"options": {"partition": "gpu", "time": "02:00:00"},
                              "stage_options": {"train": {"gres": "gpu:1"}}, "setup": ["echo setup"]})
    refused = run_sweep(study, uri, fakes, "--emit_slurm", str(tmp_path / "jobs"))
    assert refused.returncode == 2 and "tracking server" in refused.stderr
    proc = run_sweep(study, uri, fakes, "--emit_slurm", str(tmp_path / "jobs"), "--allow_local_store")
    assert proc.returncode == 0, proc.stderr
    jobs = tmp_path / "jobs"
    scripts = sorted(jobs.glob("*.sbatch"))
    assert len(scripts) == 9
    train = (jobs / "train-utility-fake-n16-s1.sbatch").read_text()
    assert "#SBATCH --partition=gpu" in train and "#SBATCH --gres=gpu:1" in train and "--node train-utility" in train
    submit = (jobs / "submit.sh").read_text()
    assert "--dependency=afterok:${JOB[train-utility-fake-n16-s1]}:${JOB[train-safety-fake-n16-s1]}" in submit
    # a stand-in sbatch that runs each job at once (in submission order, so dependencies hold)
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    code = ("import sys; from sst_lab.tracking import study as st; from sst_lab.tracking.sweep import main\n"
            f"st.STAGE_SPECS.update({{k: st.StageSpec(*v) for k, v in {_spec_args(fakes)!r}.items()}})\n"
            "sys.exit(main(sys.argv[1:]))")
    (wrapper / "fake_sweep.py").write_text(code)
    (wrapper / "sbatch").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        script="${{@: -1}}"; n=$(ls {wrapper} | wc -l)
        sed "s#{sys.executable} tracking/sweep.py#{sys.executable} {wrapper}/fake_sweep.py#" "$script" > "{wrapper}/job$n.sh"
        bash "{wrapper}/job$n.sh" >> "{wrapper}/jobs.log" 2>&1 || exit 1
        echo "$n"
    """))
    (wrapper / "sbatch").chmod(0o755)
    env = {**stage_env(), "PATH": f"{wrapper}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    sub = subprocess.run(["bash", str(jobs / "submit.sh")], env=env, capture_output=True, text=True)  # no wall-clock limit: 9 jobs in series took over 900 s under load
    assert sub.returncode == 0, sub.stdout + sub.stderr + (wrapper / "jobs.log").read_text()
    assert "submitted 9 jobs" in sub.stdout
    runs = study_runs(uri, "slurm")
    assert len(runs) == 9 and {r.info.status for r in runs} == {"FINISHED"}
    again = run_sweep(study, uri, fakes, "--node", "merge-a-fake-n16-s1")
    assert again.returncode == 0 and "plan: 3 reuse, 0 run" in again.stdout  # the node and its two inputs


# ------------------------------------------------------------------ aggregation and report
def _t_ci(values):
    v = np.asarray(values, float)
    half = sps.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return v.mean(), v.std(ddof=1), v.mean() - half, v.mean() + half


def check_aggregates(uri: str, study: str) -> list:
    """Every aggregate equals numpy's mean / std / t-interval over its members read back from MLflow."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    aggs = study_runs(uri, study, "aggregate")
    assert aggs
    checked = 0
    for agg in aggs:
        assert agg.data.tags["aggregate.ci_clipped"]  # "none" or the metrics whose interval was cut
        members = [client.get_run(r) for r in agg.data.tags["aggregate.member_run_ids"].split(",")]
        assert {m.data.tags["config_id"] for m in members} == {agg.data.tags["aggregate.group_config_id"]}
        assert len({m.data.tags["seed"] for m in members}) == len(members)
        for name in {k for m in members for k in m.data.metrics if not SKIP_METRIC.search(k)}:
            values = [m.data.metrics[name] for m in members if name in m.data.metrics]
            got = agg.data.metrics
            assert got[f"{name}/n"] == len(values)
            if len(values) >= 2:
                mean, std, low, high = _t_ci(values)
                if metric_range(name):  # a proportion's interval is cut to [0, 1], and the tag says where
                    clipped = (max(low, 0.0), min(high, 1.0)) != (low, high)
                    low, high = max(low, 0.0), min(high, 1.0)
                    assert (name in agg.data.tags["aggregate.ci_clipped"].split(",")) == clipped, name
                assert got[f"{name}/mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
                assert got[f"{name}/std"] == pytest.approx(std, rel=1e-9, abs=1e-12)
                assert got[f"{name}/ci_low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
                assert got[f"{name}/ci_high"] == pytest.approx(high, rel=1e-9, abs=1e-12)
                checked += 1
    assert checked > 0
    return aggs


def test_aggregates_match_numpy_and_rerun_updates_in_place(fake_sweep):
    uri = fake_sweep["uri"]
    written = write_aggregates("fake", uri, echo=lambda _: None)
    aggs = check_aggregates(uri, "fake")
    assert any(a.data.tags["aggregate.ci_clipped"] != "none" for a in aggs)  # the fake values reach the cut
    # 24 nodes in 12 seed-pairs -> 12 groups (base eval: 1 group of 2 seeds too)
    assert len(aggs) == len(written) == 12
    before = {r.info.run_id for r in aggs}
    write_aggregates("fake", uri, echo=lambda _: None)
    after = study_runs(uri, "fake", "aggregate")
    assert {r.info.run_id for r in after} == before and {r.info.status for r in after} == {"FINISHED"}
    # paired comparison of the two methods across seeds
    client = mlflow.MlflowClient(tracking_uri=uri)
    a = next(r for r in after if r.data.tags["aggregate.group_stage"] == "evaluate"
             and r.data.tags["aggregate.method"] == "a")
    b = next(r for r in after if r.data.tags["aggregate.group_stage"] == "evaluate"
             and r.data.tags["aggregate.method"] == "b")
    name = "utility/task/exact_match"
    ma = {client.get_run(i).data.tags["seed"]: client.get_run(i).data.metrics[name]
          for i in a.data.tags["aggregate.member_run_ids"].split(",")}
    mb = {client.get_run(i).data.tags["seed"]: client.get_run(i).data.metrics[name]
          for i in b.data.tags["aggregate.member_run_ids"].split(",")}
    diffs = [ma[s] - mb[s] for s in sorted(ma)]
    assert a.data.metrics[f"paired/b/{name}/mean"] == pytest.approx(np.mean(diffs))
    assert a.data.metrics[f"paired/b/{name}/p_value"] == pytest.approx(sps.ttest_rel([ma[s] for s in sorted(ma)],
                                                                                      [mb[s] for s in sorted(mb)]).pvalue)


def test_report_renders_and_matches_the_aggregates(fake_sweep, tmp_path):
    uri = fake_sweep["uri"]
    write_aggregates("fake", uri, echo=lambda _: None)
    proc = subprocess.run([sys.executable, "tracking/report.py", "--study", "fake", "--tracking_uri", uri,
                           "--config", str(fake_sweep["study"]), "--output_dir", str(tmp_path / "report")],
                          cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    check_report(uri, "fake", tmp_path / "report", proc.stdout)


def check_report(uri: str, study: str, folder: Path, stdout: str, require_tax: bool = True) -> None:
    html_text = (folder / "report.html").read_text()
    for name in ("pareto", "safety_tax", "metrics_vs_sample_size", "sst_eigen_spectra"):
        png = (folder / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    assert html_text.count("data:image/png;base64,") == 4
    table = json.loads((folder / "report_table.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    filled = [c for c in table["cells"] if c["mean"] is not None]
    columns = {"safety", "overrefusal", "utility"} | ({"tax"} if require_tax else set())
    assert filled and columns <= {c["column"] for c in filled}
    for c in filled:
        agg = client.get_run(c["aggregate_run_id"])
        assert agg.data.tags["stage"] == "aggregate"
        m = agg.data.metrics
        assert c["mean"] == m[f"{c['metric']}/mean"] and c["n"] == m[f"{c['metric']}/n"]
        assert c["ci_low"] == m.get(f"{c['metric']}/ci_low") and c["ci_high"] == m.get(f"{c['metric']}/ci_high")
        assert f"{c['mean']:.3f}{interval_text(c['mean'], c['ci_low'], c['ci_high'])} ({c['n']})" in html_text
    run_id = re.search(r"run_id: (\w+)", stdout).group(1)
    report_run = client.get_run(run_id)
    assert report_run.data.tags["stage"] == "report" and report_run.info.status == "FINISHED"
    names = {f.path for f in client.list_artifacts(run_id, "report")}
    assert {"report/report.html", "report/pareto.png", "report/report_table.json"} <= names


# ------------------------------------------------------------ the tiny world, real stages
@pytest.fixture(scope="module")
def tiny_world_study(world, tmp_path_factory):
    """configs/studies/tiny.yaml cut to one sample size and its SST method (1 size x 2 seeds x 1 method,
    18 stage runs: 4 train, 2 merge, 8 evaluate, 4 compare) with the real stages and cheaper settings;
    killed early, resumed to the end, then swept a third time. Two seeds keep every aggregate a real
    mean and interval, SST keeps the report's eigen-spectra; the full grid's expansion (sizes, TIES) is
    checked by test_tiny_study_grid, several methods in one sweep by the fake sweeps, TIES on the real
    adapters by tests/test_merge_stage.py."""
    d = tmp_path_factory.mktemp("tiny_study")
    uri, name = f"sqlite:///{d}/mlflow.db", "tiny-e2e"
    data = yaml.safe_load((REPO / "configs/studies/tiny.yaml").read_text())
    data["name"] = name
    data["sample_sizes"] = [100]
    data["merge"]["methods"] = [m for m in data["merge"]["methods"] if m["name"] == "sst-k16"]
    data["train"]["args"] = {"max_steps": 4}
    data["evaluate"]["args"]["minimal_n"] = 12
    data["compare"]["args"]["n_boot"] = 500
    study = d / "tiny.yaml"
    study.write_text(yaml.safe_dump(data))
    ensure_experiment(uri, name)
    cmd = [sys.executable, "tracking/sweep.py", "--config", str(study), "--tracking_uri", uri, "--workers", "2",
           "--output_root", str(d / "outputs")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    while True:  # kill it once four stages finished and one is running
        time.sleep(2)
        statuses = [r.info.status for r in study_runs(uri, name)]
        if statuses.count("FINISHED") >= 4 and "RUNNING" in statuses:
            break
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    killed_out, _ = proc.communicate()
    after_kill = study_runs(uri, name)
    resumed = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    n_runs = len(study_runs(uri, name))
    again = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True)
    return {"uri": uri, "name": name, "study": study, "dir": d, "killed_rc": proc.returncode, "killed_out": killed_out,
            "after_kill": after_kill, "resumed": resumed, "again": again, "n_runs_before_again": n_runs,
            "seconds": seconds}


def test_tiny_world_study_killed_resumed_and_reused(tiny_world_study):
    t = tiny_world_study
    assert t["killed_rc"] == 128 + signal.SIGTERM, t["killed_out"]
    assert "RUNNING" not in {r.info.status for r in t["after_kill"]}
    assert t["resumed"].returncode == 0, t["resumed"].stdout + t["resumed"].stderr
    assert t["again"].returncode == 0 and "18 reused" in t["again"].stdout, t["again"].stdout
    runs = study_runs(t["uri"], t["name"])
    assert len(runs) == t["n_runs_before_again"]  # the third sweep started nothing
    per_node = finished_per_node(runs)
    assert len(per_node) == 18 and set(per_node.values()) == {1}  # no duplicate runs
    stages = [r.data.tags["stage"] for r in runs if r.info.status == "FINISHED"]
    assert {s: stages.count(s) for s in st.PIPELINE} == {"train": 4, "merge": 2, "evaluate": 8, "compare": 4}
    by_node = {r.data.tags["sweep.node"]: r for r in runs if r.info.status == "FINISHED"}
    ev = by_node["evaluate-merged-sst-k16-tiny-world-n100-s2"]
    lineage = ev.data.tags["upstream_run_ids"].split(",")
    assert lineage[0] == by_node["merge-sst-k16-tiny-world-n100-s2"].info.run_id
    assert by_node["train-safety-tiny-world-n100-s2"].info.run_id in lineage
    cmp_ = by_node["compare-merged-sst-k16-vs-utility-tiny-world-n100-s1"]
    assert "compare/safety_gain" in cmp_.data.metrics and cmp_.data.tags["compare/safety_tax_status"]
    print(f"tiny-world study: killed + resumed to the end in {t['seconds']:.0f} s")


def test_tiny_world_aggregate_and_report(tiny_world_study, tmp_path):
    t = tiny_world_study
    for _ in range(2):  # the second aggregation updates the same runs
        proc = subprocess.run([sys.executable, "tracking/aggregate.py", "--study", t["name"], "--tracking_uri", t["uri"]],
                              cwd=REPO, env=stage_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    aggs = check_aggregates(t["uri"], t["name"])
    groups = [(r.data.tags["aggregate.group_stage"], r.data.tags["aggregate.group_config_id"]) for r in aggs]
    assert len(groups) == len(set(groups)) == 9  # 18 runs in pairs of seeds
    proc = subprocess.run([sys.executable, "tracking/report.py", "--study", t["name"], "--tracking_uri", t["uri"],
                           "--config", str(t["study"]), "--output_dir", str(tmp_path / "report")],
                          cwd=REPO, env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check_report(t["uri"], t["name"], tmp_path / "report", proc.stdout, require_tax=False)
