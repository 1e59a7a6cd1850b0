"""Parallel stage processes against an ``mlflow server`` backed by PostgreSQL (the many-workers store).

Needs a PostgreSQL server: ``$SST_LAB_TEST_POSTGRES_URI`` (CI: ``scripts/ci_postgres.sh`` installs
the Debian package, starts a cluster on loopback and prints the URI), else a throwaway cluster
that this test initialises and starts itself from the installed binaries. Skips when no PostgreSQL
server binary is installed. The test starts ``mlflow server`` on a free loopback port itself.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO, stage_env
from test_study import fake_study, finished_per_node, run_sweep, study_runs, write_fake_stages


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: [int(x) for x in
                                                                                  Path(p).parts[4].split(".")])
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    return Path(which).resolve().parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, log: Path | None = None, attempts: int = 600):
    for _ in range(attempts):
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not come up" + (f":\n{log.read_text()[-3000:]}" if log and log.exists() else ""))


@pytest.fixture(scope="module")
def postgres_uri():
    uri = os.environ.get("SST_LAB_TEST_POSTGRES_URI")
    if uri:
        yield uri
        return
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binary found (Debian package `postgresql`); "
                    "scripts/ci_postgres.sh installs and starts one and prints SST_LAB_TEST_POSTGRES_URI")
    # a throwaway cluster, owned by the postgres user when we are root (the server refuses root)
    data = Path(tempfile.mkdtemp(prefix="sst-lab-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    log = data / "server.log"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(log), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "sstlab"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/sstlab"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres_uri, tmp_path_factory):
    """``mlflow server`` on loopback with the PostgreSQL backend store and proxied artifacts."""
    if postgres_uri.startswith("postgresql://"):  # SQLAlchemy 2.1 defaults to psycopg 3; we install psycopg2
        postgres_uri = "postgresql+psycopg2://" + postgres_uri[len("postgresql://"):]
    d = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = d / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_uri,
                                 "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "2"], cwd=d, env=stage_env(),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=5).status == 200
        except OSError:
            return False

    _wait(healthy, "mlflow server", log)
    yield url
    os.killpg(proc.pid, 15)
    proc.wait()


@pytest.fixture(scope="module")
def fakes_pg(tmp_path_factory) -> dict:
    return write_fake_stages(tmp_path_factory.mktemp("fake_stages_pg"))


def test_parallel_stage_processes_through_a_postgres_backed_server(server, fakes_pg, tmp_path):
    name = f"pg-fake-{uuid.uuid4().hex[:8]}"
    study = fake_study(fakes_pg, tmp_path / "study.yaml", name=name)
    first = run_sweep(study, server, fakes_pg, "--workers", "4")
    assert first.returncode == 0 and "24 finished" in first.stdout, first.stdout + first.stderr
    runs = study_runs(server, name)
    assert len(runs) == 24 and {r.info.status for r in runs} == {"FINISHED"}
    assert set(finished_per_node(runs).values()) == {1}
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert max(sum(s < e2 and s2 < e for s2, e2 in spans) for s, e in spans) >= 2  # runs overlapped: parallel
    merge = next(r for r in runs if r.data.tags["stage"] == "merge")
    client = mlflow.MlflowClient(tracking_uri=server)
    local = client.download_artifacts(merge.info.run_id, "merge_report.json", str(tmp_path))  # proxied artifacts
    assert json.loads(Path(local).read_text())["modules"]
    again = run_sweep(study, server, fakes_pg, "--workers", "4")
    assert again.returncode == 0 and "24 reused" in again.stdout


def test_real_train_stages_in_parallel_through_the_server(server, tmp_path):
    name = f"pg-train-{uuid.uuid4().hex[:8]}"
    data = {"name": name, "models": [{"name": "tiny", "configs": ["configs/models/tiny.yaml"]}],
            "sample_sizes": [16], "seeds": [1],  # utility and safety: two stages at once with 2 workers
            "train": {"utility": ["configs/train/utility.yaml"], "safety": ["configs/train/safety.yaml"],
                      "args": {"max_steps": 2}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "tracking/sweep.py", "--config", str(tmp_path / "study.yaml"),
                           "--tracking_uri", server, "--workers", "2", "--output_root", str(tmp_path / "out")],
                          cwd=REPO, env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "2 finished" in proc.stdout, proc.stdout + proc.stderr
    runs = study_runs(server, name)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {(r.data.tags["role"], r.data.tags["seed"]) for r in runs} == {("utility", "1"), ("safety", "1")}
    client = mlflow.MlflowClient(tracking_uri=server)
    for r in runs:
        names = {f.path for f in client.list_artifacts(r.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in names, names
