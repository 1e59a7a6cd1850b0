"""Stages link by MLflow run id: resolve an upstream reference to its files, config id and tags.

A reference is either a local path (no lineage) or an MLflow run id (32 hex characters,
optionally written ``runs:/<run_id>``). A run reference must point at a FINISHED run of the
expected stage; its artifact is downloaded (local stores: copied) and its ``config_id`` is what the
downstream stage hashes instead of the run id, so repeated seeds of a study group together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from sst_lab.tracking.run import TrackingError, resolve_tracking_uri

_RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})/?$")


@dataclass(frozen=True)
class Upstream:
    ref: str                     # as given in the config
    path: Path                   # local folder with the artifact
    run_id: str | None = None    # None for a plain path
    config_id: str | None = None
    tags: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def identity(self) -> str:
        """What a downstream config_id hashes: the upstream config_id (seed-free), else the path."""
        if self.run_id is None:
            return f"path:{self.path.resolve()}"
        return f"config:{self.config_id}"


def is_run_ref(ref: str) -> bool:
    return bool(_RUN_ID.match(ref.strip()))


def resolve(ref: str, *, artifact_path: str, expect_stage: str | None, dst: Path,
            tracking_uri: str | None = None, field_name: str = "input") -> Upstream:
    """Resolve ``ref`` (path or run id) to a local copy of ``artifact_path`` and its lineage."""
    ref = str(ref).strip()
    m = _RUN_ID.match(ref)
    if m is None:
        path = Path(ref).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{field_name}: {path} does not exist (give a folder or an MLflow run id)")
        return Upstream(ref=ref, path=path)
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = m.group(2)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"{field_name}: run {run_id} not found in {uri}: {exc}") from None
    tags = dict(run.data.tags)
    if run.info.status != "FINISHED":
        raise TrackingError(f"{field_name}: run {run_id} has status {run.info.status}, not FINISHED")
    if expect_stage is not None and tags.get("stage") != expect_stage:
        raise TrackingError(f"{field_name}: run {run_id} is a {tags.get('stage')!r} run, expected {expect_stage!r}")
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    tracking_uri=uri, dst_path=str(dst))
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"{field_name}: run {run_id} has no artifact {artifact_path!r}: {exc}") from None
    return Upstream(ref=ref, path=Path(local), run_id=run_id, config_id=tags.get("config_id"), tags=tags)


def lineage_ids(*upstreams: Upstream | None) -> list[str]:
    """Direct upstream run ids plus theirs (evaluate -> merge -> train), de-duplicated, in order."""
    out: list[str] = []
    for up in upstreams:
        if up is None or up.run_id is None:
            continue
        for rid in [up.run_id, *filter(None, up.tags.get("upstream_run_ids", "").split(","))]:
            if rid != "none" and rid not in out:
                out.append(rid)
    return out
