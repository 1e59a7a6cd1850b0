"""The one way a stage opens, fills and closes its MLflow run.

``stage_run(...)`` is a context manager used by every stage script (train, merge, evaluate,
compare, aggregate, report)::

    with stage_run(stage="train", study=args.study, config=resolved, tags={...}) as run:
        ...                      # run.log_metrics(...), run.log_json(...), ...

What it guarantees:

* the tracking store is resolved once (``--tracking_uri`` > ``MLFLOW_TRACKING_URI`` >
  ``sqlite:///<cwd>/mlruns/mlflow.db``); a local sqlite store gets its schema and the
  experiment created under a file lock, so several stage processes may start at once;
* only the main process (``RANK`` 0 under ``accelerate launch``) opens a run; other ranks get a
  disabled ``StageRun`` whose logging calls do nothing;
* every run carries the standard tags (stage, base_model, role, sample_size, seed, config_id,
  git commit and dirty flag, library versions, upstream_run_ids) and the whole resolved config as
  flattened params plus a ``config/resolved_config.yaml`` artifact, all redacted;
* a run that raises, or is interrupted by SIGINT/SIGTERM, ends FAILED with ``error.txt``
  (the redacted traceback) as an artifact; it is never left RUNNING;
* metrics are checked: a non-finite value or a name MLflow cannot store is an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sst_lab.redact import redact, redact_text, redacting_console

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

STAGES = ("train", "merge", "evaluate", "select", "compare", "aggregate", "report", "calibrate")
# Fields that identify *where* or *which repetition*, not *what*: left out of config_id.
CONFIG_ID_EXCLUDE = {"seed", "data_seed", "output_dir", "logging_dir", "run_name", "tracking_uri",
                     "study", "hub_token", "push_to_hub", "report_to", "overwrite_output_dir",
                     "metrics_flush_seconds"}
MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY_LEN = 250
_METRIC_NAME = re.compile(r"^[/\w.\- ]*$")
REPO_ROOT = Path(__file__).resolve().parent.parent


class TrackingError(RuntimeError):
    """A tracking-store problem (bad URI, over-long key, invalid metric...)."""


class StageInterrupted(BaseException):
    """Raised inside a stage when SIGTERM arrives, so the run ends FAILED."""


# ----------------------------------------------------------------------------------- the store
def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """``--tracking_uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlruns/mlflow.db``."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = "sqlite:///" + str(Path.cwd() / "mlruns" / "mlflow.db")
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise schema creation and experiment creation on a local sqlite store."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_suffix(".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def artifact_root(uri: str, study: str) -> str | None:
    """Artifacts of a local sqlite store live under ``<store dir>/artifacts/<study>``."""
    db = _sqlite_path(uri)
    if db is None:
        return None  # a server decides (``--default-artifact-root`` / ``--serve-artifacts``)
    safe = re.sub(r"[^\w.-]+", "_", study)
    return (db.parent / "artifacts" / safe).as_uri()


def check_store_writable(uri: str) -> None:
    """A local sqlite store must be writable before MLflow touches it (MLflow would retry an unopenable
    file for ~100 s and end in a long SQLAlchemy traceback): one write transaction, rolled back."""
    import sqlite3

    db = _sqlite_path(uri)
    if db is None:
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(db), timeout=30)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except (OSError, sqlite3.Error) as exc:
        raise TrackingError(f"tracking store {uri} cannot be written ({type(exc).__name__}: {exc}); give a writable "
                            "--tracking_uri or fix the file's permissions") from None


def ensure_experiment(uri: str, study: str) -> str:
    """Create (once, race-free) the store and the study's experiment; return its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    check_store_writable(uri)
    with _store_lock(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)  # creating the client creates the sqlite schema
        client.search_experiments(max_results=1)
        for attempt in range(5):
            exp = client.get_experiment_by_name(study)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"experiment {study!r} is deleted in {uri}; restore it in the MLflow UI or pick "
                        "another --study (sst-lab never deletes or overwrites runs)")
                return exp.experiment_id
            try:
                return client.create_experiment(study, artifact_location=artifact_root(uri, study))
            except MlflowException as exc:  # another process (server mode) created it first
                if "already exists" not in str(exc).lower() or attempt == 4:
                    raise
    raise TrackingError(f"could not create experiment {study!r} in {uri}")


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/torchrun, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------ params, ids, tags
def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to ``a.b.c`` keys; lists stay values (JSON-encoded later)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            nested = flatten(value, name)
            clash = set(nested) & set(out)
            if clash:
                raise TrackingError(f"flattened config keys collide: {sorted(clash)}")
            out.update(nested)
        else:
            if name in out:
                raise TrackingError(f"flattened config key {name!r} appears twice")
            out[name] = value
    return out


def _param_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def config_id(config: Mapping[str, Any], exclude: set[str] = CONFIG_ID_EXCLUDE) -> str:
    """Hash of the resolved config without seed and location fields (groups repeated seeds).

    Stages whose inputs are upstream runs put the upstream runs' ``config_id`` (not their run
    id) into ``config`` before calling this, so seeds of a merge or evaluation group too.
    """
    flat = {k: v for k, v in flatten(config).items() if k.rsplit(".", 1)[-1] not in exclude}
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_state(repo: Path = REPO_ROOT) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  check=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "not_a_git_checkout", "git_dirty": "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower()}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "mlflow", "accelerate", "datasets"):
        try:
            out[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            out[f"version.{pkg}"] = "not_installed"
    return out


# ------------------------------------------------------------------------------- the run
@dataclass
class StageRun:
    """Handle of the active stage run; every method is a no-op when ``enabled`` is False."""

    enabled: bool
    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    metrics_flush_seconds: float = 10.0
    _buffers: list["MetricBuffer"] = field(default_factory=list, repr=False)
    _guard: "_InterruptGuard | None" = field(default=None, repr=False)

    def store_call(self) -> contextlib.AbstractContextManager:
        """Hold SIGTERM/SIGINT during a store call: one interrupted inside SQLAlchemy can leave a
        sqlite statement open whose lock then blocks recording the run as FAILED."""
        return self._guard.deferred() if self._guard is not None else contextlib.nullcontext()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite numbers under valid names; anything else is an error, never a placeholder."""
        clean = _checked_metrics(metrics)
        if self.enabled and clean:
            import mlflow

            with self.store_call():
                mlflow.log_metrics(clean, step=step)

    def metric_buffer(self) -> "MetricBuffer":
        """Metrics collected in memory and written in one batch every ``metrics_flush_seconds``
        (and when the run closes, FINISHED or FAILED): a per-step curve costs the loop nothing."""
        buffer = MetricBuffer(self, self.metrics_flush_seconds)
        self._buffers.append(buffer)
        return buffer

    def flush(self) -> None:
        for buffer in self._buffers:
            buffer.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            import mlflow

            with self.store_call():
                mlflow.set_tags({k: redact_text(str(v)) for k, v in tags.items()})
            self.tags.update({k: str(v) for k, v in tags.items()})

    def log_json(self, obj: Any, artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            with self.store_call():
                mlflow.log_dict(redact(obj), artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            with self.store_call():
                mlflow.log_artifacts(str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            with self.store_call():
                mlflow.log_artifact(str(local_file), artifact_path)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Per-item results as an MLflow table artifact (``.json``), shown in the UI's evaluation view."""
        if self.enabled and rows:
            import mlflow
            import pandas as pd

            frame = pd.DataFrame(rows)
            with self.store_call():
                mlflow.log_table(frame, artifact_file=artifact_file)

    def log_dataset(self, records: list[dict[str, Any]], *, name: str, source: str, context: str) -> None:
        """``mlflow.log_input`` with name, source path, digest, split (context) and row count."""
        if not self.enabled:
            return
        import mlflow
        import pandas as pd

        flat = [{k: v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, sort_keys=True)
                 for k, v in r.items()} for r in records]
        ds = mlflow.data.from_pandas(pd.DataFrame(flat), source=source, name=name)
        with self.store_call():
            mlflow.log_input(ds, context=context, tags={"rows": str(len(records))})


def _checked_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    clean = {}
    for name, value in metrics.items():
        if not _METRIC_NAME.match(name) or len(name) > MAX_KEY_LEN:
            raise TrackingError(f"metric name {name!r} is not storable in MLflow (^[/\\w.\\- ]*$, <=250 chars)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrackingError(f"metric {name!r} = {value!r} is not a finite number; omit it with a "
                                "logged reason instead of logging a placeholder")
        clean[name] = float(value)
    return clean


class MetricBuffer:
    """Checked metrics held in memory with their step and time, written by one ``log_batch``.

    Logging to the store at every training step cost 12-18 % of the tiny world's training
    throughput (a SQL transaction per step; MLflow's asynchronous mode was no better: its writer
    thread competes for the GIL). Buffered, the curve is the same (each point keeps its step and
    timestamp) and reaches the store every ``flush_seconds`` and when the run closes.
    """

    def __init__(self, run: StageRun, flush_seconds: float):
        import time

        self.run, self.flush_seconds = run, flush_seconds
        self._points: list[Any] = []
        self._clock = time.monotonic
        self._last = self._clock()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        clean = _checked_metrics(metrics)
        if not self.run.enabled:
            return
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self._points.extend(Metric(k, v, ms, step) for k, v in clean.items())
        if self._clock() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._last = self._clock()
        points, self._points = self._points, []
        if not points or not self.run.enabled:
            return
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.run.tracking_uri)
        with self.run.store_call():
            for i in range(0, len(points), 1000):  # MLflow's per-batch metric limit
                client.log_batch(self.run.run_id, metrics=points[i:i + 1000])


def _params_from_config(config: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    params, too_long = {}, []
    for key, value in flatten(redact(dict(config))).items():
        if len(key) > MAX_KEY_LEN:
            raise TrackingError(f"config key {key!r} is longer than MLflow's {MAX_KEY_LEN} characters")
        text = _param_str(value)
        if len(text) > MAX_PARAM_LEN:
            too_long.append(key)
            text = f"<{len(text)} chars: full value in config/resolved_config.yaml>"
        params[key] = text
    return params, too_long


@contextlib.contextmanager
def stage_run(*, stage: str, study: str, config: Mapping[str, Any], tags: Mapping[str, Any],
              run_name: str, tracking_uri: str | None = None,
              config_for_id: Mapping[str, Any] | None = None,
              resume_run_id: str | None = None, metrics_flush_seconds: float = 10.0) -> Iterator[StageRun]:
    """Open the stage's MLflow run (main process only) and close it FINISHED or FAILED.

    ``config`` is the whole resolved config (logged as params and as a YAML artifact);
    ``config_for_id`` (default ``config``) is what ``config_id`` hashes, with upstream run ids
    replaced by the upstream runs' config ids. ``tags`` must include ``role``; missing standard
    tags are filled with ``"none"`` only where they do not apply (e.g. ``sample_size`` of a merge).
    Tags named in ``$SST_LAB_RUN_TAGS`` (a JSON object a sweep sets for its child stages) are
    added where the stage sets none of its own. ``resume_run_id`` reopens that run of the same
    experiment instead of starting one (aggregate/report runs are updated, never duplicated);
    its params must not change (MLflow params are immutable). ``metrics_flush_seconds`` is how
    often ``StageRun.metric_buffer()`` writes (the train stage's per-step curves).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    with redacting_console():  # what the stage prints, and its traceback, are redacted too
        yield from _open_run(stage=stage, study=study, config=config, tags=tags, run_name=run_name,
                             tracking_uri=tracking_uri, config_for_id=config_for_id, resume_run_id=resume_run_id,
                             metrics_flush_seconds=metrics_flush_seconds)


def _open_run(*, stage: str, study: str, config: Mapping[str, Any], tags: Mapping[str, Any], run_name: str,
              tracking_uri: str | None, config_for_id: Mapping[str, Any] | None, resume_run_id: str | None,
              metrics_flush_seconds: float) -> Iterator[StageRun]:
    os.environ.pop("MLFLOW_RUN_ID", None)  # never resume someone else's run
    if not is_main_process():
        yield StageRun(enabled=False)
        return

    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = ensure_experiment(uri, study)
    except TrackingError as exc:
        print(f"[sst-lab] {stage} not started: {redact_text(str(exc))}", file=sys.stderr)
        raise
    all_tags = {"stage": stage, "study": study,
                "config_id": config_id(config_for_id if config_for_id is not None else config)}
    for key in ("base_model", "role", "sample_size", "seed", "upstream_run_ids"):
        all_tags[key] = "none"
    all_tags.update({k: ("none" if v is None else v) for k, v in tags.items()})
    all_tags.update(git_state())
    all_tags.update(host=socket.gethostname(), pid=os.getpid())  # who owns a RUNNING run (a sweep's stale check)
    all_tags.update(library_versions())
    for key, value in env_tags().items():
        all_tags.setdefault(key, value)
    all_tags = {k: redact_text(str(v)) for k, v in all_tags.items()}
    params, too_long = _params_from_config(config)
    run_name = redact_text(run_name)
    if too_long:
        all_tags["params_too_long"] = ",".join(too_long)

    stale_error = None
    if resume_run_id is not None:
        old = mlflow.MlflowClient(tracking_uri=uri).get_run(resume_run_id)
        owner = old.info.experiment_id
        if owner != experiment_id:
            raise TrackingError(f"cannot reopen run {resume_run_id}: it belongs to experiment {owner}, "
                                f"not to study {study!r} ({experiment_id})")
        stale_error = old.data.tags.get("error")  # of an earlier attempt: kept as previous_error below
        if stale_error is not None:
            all_tags["previous_error"] = stale_error

    guard, handle = _InterruptGuard(uri), None
    with guard:
        try:
            with guard.deferred():  # a signal here would leave a created run off mlflow's active-run stack
                if resume_run_id is None:
                    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags)
                else:
                    run = mlflow.start_run(run_id=resume_run_id, run_name=run_name, tags=all_tags)
                    if stale_error is not None:  # a reopened run that ends FINISHED must not show it
                        mlflow.MlflowClient(tracking_uri=uri).delete_tag(resume_run_id, "error")
                guard.run_id = run.info.run_id
            handle = StageRun(enabled=True, run_id=run.info.run_id, experiment_id=experiment_id,
                              tracking_uri=uri, tags=dict(all_tags), metrics_flush_seconds=metrics_flush_seconds,
                              _guard=guard)
            with guard.deferred():
                items = list(params.items())
                for i in range(0, len(items), 100):
                    mlflow.log_params(dict(items[i:i + 100]))
                mlflow.log_text(yaml.safe_dump(redact(_plain(config)), sort_keys=False), "config/resolved_config.yaml")
            yield handle
            guard.raise_if_swallowed()
            handle.flush()
        except BaseException as exc:
            if guard.run_id is not None:
                with guard.deferred(raise_pending=False):  # the run is closing FAILED already
                    _fail(exc, guard.run_id, uri, before=handle.flush if handle is not None else None)
            raise
        else:
            with guard.deferred():  # a signal now is acted on once the run is FINISHED
                mlflow.end_run(status="FINISHED")


RUN_TAGS_ENV = "SST_LAB_RUN_TAGS"


def env_tags() -> dict[str, str]:
    """Extra tags from ``$SST_LAB_RUN_TAGS`` (a JSON object of strings), e.g. a sweep's node labels."""
    text = os.environ.get(RUN_TAGS_ENV)
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrackingError(f"${RUN_TAGS_ENV} is not valid JSON: {exc}") from None
    if not isinstance(tags, dict):
        raise TrackingError(f"${RUN_TAGS_ENV} must be a JSON object, got {type(tags).__name__}")
    return {str(k): str(v) for k, v in tags.items()}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fail(exc: BaseException, run_id: str, uri: str, before: Any = None) -> None:
    """Record the (redacted) error and end ``run_id`` FAILED; never mask the original error.

    ``before`` (the run's metric flush) runs first. If this process cannot write to the store
    (a lock left by an interrupted store call of its own), a helper process of the same process
    group records the failure as soon as this one has exited (a sweep waits for the group)."""
    import mlflow

    tag = redact_text(f"{type(exc).__name__}: {exc}")[:5000]
    text = redact_text("".join(traceback.format_exception(exc)))
    _release_store_locks(exc)
    try:
        if before is not None:
            before()
        client = mlflow.MlflowClient(tracking_uri=uri)
        client.log_text(run_id, text, "error.txt")
        client.set_tag(run_id, "error", tag)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status="FAILED")
        else:  # mlflow already dropped it from its stack (e.g. an error inside end_run)
            client.set_terminated(run_id, status="FAILED")
    except Exception as write_exc:  # noqa: BLE001 - the original error is re-raised by the caller
        _forget_active_run(run_id)  # mlflow's atexit hook would otherwise end it FINISHED
        note = f"\n(recorded after the stage process exited: it could not write: {type(write_exc).__name__}: " \
               f"{str(write_exc)[:500]})\n"
        _record_failure_after_exit(uri, run_id, text + redact_text(note), tag)
    print(f"[sst-lab] run FAILED: {tag}", file=sys.stderr)


def _forget_active_run(run_id: str) -> None:
    from mlflow.tracking import fluent

    try:
        stack = fluent._active_run_stack.get()
        if stack and stack[-1].info.run_id == run_id:
            stack.pop()
    except Exception as exc:  # noqa: BLE001 - private MLflow state; say so if it moved
        print(f"[sst-lab] could not drop run {run_id} from mlflow's active-run stack: {exc}", file=sys.stderr)


def _record_failure_after_exit(uri: str, run_id: str, text: str, tag: str) -> None:
    """Start ``python -m sst_lab.tracking.run --record-failure`` in this process group."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="sst-lab-failure-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump({"uri": uri, "run_id": run_id, "pid": os.getpid(), "text": text, "tag": tag}, fh)
    subprocess.Popen([sys.executable, "-m", "sst_lab.tracking.run", "--record-failure", path],
                     stdin=subprocess.DEVNULL, close_fds=True)
    print(f"[sst-lab] the store refused this process's writes; run {run_id} is recorded FAILED by a helper "
          "process once this one has exited", file=sys.stderr)


def proc_stat(stat: Path) -> list[str] | None:
    """Fields of a ``/proc/<pid>/stat`` line after the command name (state, ppid, pgrp, ...);
    None when the process is gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_gone(pid: int) -> bool:
    if Path("/proc/self").exists():
        fields = proc_stat(Path(f"/proc/{pid}/stat"))
        return fields is None or fields[0] == "Z"
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def _record_failure(path: str, timeout: float = 3600.0) -> int:
    """The helper: wait for the stage process to exit (its locks go with it), then record FAILED."""
    import time

    job = json.loads(Path(path).read_text())
    deadline = time.monotonic() + timeout
    while not _process_gone(job["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        _mark_failed(job["uri"], job["run_id"], job["tag"], job["text"])
    finally:
        Path(path).unlink(missing_ok=True)
    return 0


def _mark_failed(uri: str, run_id: str, tag: str, text: str | None = None) -> None:
    """Record a run FAILED from outside its stage's normal path (helper process, watchdog)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        if text is not None:
            client.log_text(run_id, text, "error.txt")
    finally:
        client.set_tag(run_id, "error", tag)
        client.set_terminated(run_id, status="FAILED")


def _release_store_locks(exc: BaseException) -> None:
    """Close what an interrupted store call left open before the run is recorded FAILED.

    A signal raised inside a SQLAlchemy read (e.g. a stage's own ``MlflowClient().get_run``)
    leaves the sqlite cursor alive in the traceback's frames, and its SHARED lock makes every
    write of this process wait and fail ("database is locked"). Clearing the finished frames of
    the exception chain drops the cursor; disposing the store's engine closes its connections.
    """
    import gc

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__
    gc.collect()
    try:
        from mlflow.tracking._tracking_service.utils import _get_store

        engine = getattr(_get_store(), "engine", None)
        if engine is not None:
            engine.dispose()
    except Exception as dispose_exc:  # noqa: BLE001 - best effort: the writes below report any real problem
        print(f"[sst-lab] could not reset the store's connections: {dispose_exc}", file=sys.stderr)


INTERRUPT_GRACE_ENV = "SST_LAB_INTERRUPT_GRACE_SECONDS"


class _InterruptGuard:
    """SIGTERM/SIGINT handling of one stage run, so an interrupted run always ends FAILED.

    A signal raises :class:`StageInterrupted` in the main thread, except inside ``deferred()``
    sections (creating and closing the run), where it is held and raised on leaving the
    section. Python swallows an exception raised inside a finalizer (``__del__``, a weakref
    callback), so the guard also remembers every signal: a stage body that returns after one ends
    FAILED, and a watchdog thread started by the first signal ends the run FAILED and exits the
    process (128 + signal) if the run is still open ``$SST_LAB_INTERRUPT_GRACE_SECONDS`` (60)
    later. Outside the main thread (no signal handlers possible) the guard does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, uri: str):
        import threading

        self.uri, self.run_id = uri, None
        self.received: int | None = None  # first signal seen
        self.pending: int | None = None  # a signal held inside a deferred section
        self.defer = False
        self.closed = threading.Event()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_InterruptGuard":
        if _in_main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.closed.set()
        for sig, old in self.previous.items():
            signal.signal(sig, old)

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum
            self._start_watchdog(signum)
        if self.defer:
            self.pending = self.pending or signum
            return
        raise StageInterrupted(f"stage interrupted by signal {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def deferred(self, raise_pending: bool = True) -> Iterator[None]:
        self.defer = True
        try:
            yield
        finally:
            self.defer = False
        signum, self.pending = self.pending, None
        if signum is not None and raise_pending:
            raise StageInterrupted(f"stage interrupted by signal {signal.Signals(signum).name}")

    def raise_if_swallowed(self) -> None:
        if self.received is not None:
            raise StageInterrupted(f"stage interrupted by signal {signal.Signals(self.received).name} "
                                   "(the interruption was swallowed inside the stage, which then went on)")

    def _start_watchdog(self, signum: int) -> None:
        import threading

        grace = float(os.environ.get(INTERRUPT_GRACE_ENV, "60"))
        threading.Thread(target=self._watch, args=(signum, grace), daemon=True, name="sst-lab-interrupt").start()

    def _watch(self, signum: int, grace: float) -> None:
        if self.closed.wait(grace):
            return
        name = signal.Signals(signum).name
        message = (f"StageInterrupted: stage interrupted by signal {name}; still running {grace:g} s later "
                   f"(the interruption was swallowed), so the process was ended")
        try:
            if self.run_id is not None:
                _mark_failed(self.uri, self.run_id, message)
        finally:
            print(f"[sst-lab] run FAILED: {message}", file=sys.stderr, flush=True)
            os._exit(128 + signum)


def _plain(obj: Any) -> Any:
    """YAML-safe copy of a config (tuples -> lists, enums/paths -> str)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--record-failure":
    sys.exit(_record_failure(sys.argv[2]))
