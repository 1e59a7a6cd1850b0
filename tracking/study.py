"""Studies: a grid of models x sample sizes x seeds x merge methods, run as stage processes.

A study YAML (``configs/studies/*.yaml``, fields documented on the dataclasses below) expands into
a plan of :class:`Node` s, one per stage run: train the utility and safety adapters, merge them with
every method, evaluate base / utility / safety / merged, compare each candidate with its
reference. A node's inputs are its upstream nodes; at run time they become upstream run ids.

Identity and reuse. Every node has a seed-free ``key``: the hash of its stage, its merged config
files plus overrides, and its upstream nodes' keys (never run ids). The sweep labels each run it
starts with ``sweep.key`` and ``sweep.seed`` tags (through ``$SST_LAB_RUN_TAGS``), so a node whose
(key, seed) already has a FINISHED run in the study is reused, not rerun; a killed sweep resumes
where it stopped. The stage's own ``config_id`` (what aggregation groups by) is recorded and checked
for drift across seeds of a key. A RUNNING run whose process is gone (same host, dead pid) is
marked FAILED and rerun; one that may still run elsewhere blocks its node unless
``rerun_running``. Sweeps of one study may run at once: each node is claimed in the store before it
starts (:class:`Claims`) and re-read just before, so no node is started twice; the earliest
FINISHED run of a (key, seed) is the one reused (``aggregation.DUPLICATE_RULE``).

Execution. :func:`execute` runs the plan with a pool of ``workers`` child processes (each stage in
its own session, ``accelerate launch`` for training), respecting dependencies; on failure it stops
launching (``on_failure: stop``) or skips only the failed node's dependents (``continue``).
SIGINT/SIGTERM are forwarded to the running stages (their runs end FAILED) before it exits.
:func:`emit_slurm` writes one ``sbatch`` job per node instead, chained with ``afterok``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sst_lab.config import ConfigError, merge_config_files, read_yaml
from sst_lab.redact import redact_text
from sst_lab.tracking.aggregation import DUPLICATE_RULE, run_order
from sst_lab.tracking.run import REPO_ROOT, RUN_TAGS_ENV, proc_stat, resolve_tracking_uri
from sst_lab.tracking.selection import SelectionError, SelectionSpec

ROLES_EVAL = ("base", "utility", "safety", "merged")
RESERVED_ARGS = {"seed", "output_dir", "study", "tracking_uri", "config", "adapter", "utility_adapter",
                 "safety_adapter", "candidate", "reference", "run_name"}
_RUN_ID_LINE = re.compile(r"^run_id: ([0-9a-f]{32})\s*$", re.M)
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class StageSpec:
    script: str
    output_dir: bool  # takes --output_dir


STAGE_SPECS = {
    "train": StageSpec("train/sft.py", True),
    "merge": StageSpec("merge/merge.py", True),
    "evaluate": StageSpec("evaluate/evaluate.py", True),
    "compare": StageSpec("evaluate/compare.py", False),
    "select": StageSpec("tracking/select.py", False),  # only in studies with a selection section
}
PIPELINE = ("train", "merge", "evaluate", "compare")  # the stages of every study
SCHEDULE = {"train": 0, "merge": 1, "evaluate": 2, "select": 3, "compare": 4}  # earlier first when both are ready


# ------------------------------------------------------------------------------ study config
@dataclass
class ModelSpec:
    configs: list[str]  # model preset(s), e.g. [configs/models/tiny.yaml]
    name: str | None = None  # label in plots and node ids; default: basename of model_name_or_path
    accelerate_config: str | None = None  # default: train.accelerate_config
    args: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage extra overrides {train: {...}}
    slurm: dict[str, Any] = field(default_factory=dict)  # sbatch options of its train jobs (e.g. more GPUs)


@dataclass
class TrainSpec:
    utility: list[str]  # role config(s) of the utility adapter
    safety: list[str]
    args: dict[str, Any] = field(default_factory=dict)  # --key value overrides for every train run
    accelerate_config: str | None = "configs/accelerate/cpu.yaml"  # None: plain python, no accelerate
    sample_size_roles: list[str] = field(default_factory=lambda: ["utility", "safety"])  # roles the sizes apply to


@dataclass
class MethodSpec:
    name: str  # unique label (node ids, tag sweep.method, report rows)
    method: str  # merge method registry name
    args: dict[str, Any] = field(default_factory=dict)  # e.g. {k: 16, alpha: 1.0}


@dataclass
class MergeSpec:
    methods: list[MethodSpec]
    configs: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateSpec:
    configs: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    roles: list[str] = field(default_factory=lambda: list(ROLES_EVAL))


@dataclass
class CompareSpec:
    args: dict[str, Any] = field(default_factory=dict)
    pairs: list[list[str]] = field(default_factory=lambda: [["merged", "utility"], ["safety", "base"]])  # [cand, ref]


@dataclass
class SlurmSpec:
    options: dict[str, Any] = field(default_factory=dict)  # #SBATCH --key=value for every job
    stage_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage, on top
    setup: list[str] = field(default_factory=list)  # shell lines before the command (module load ...)


@dataclass
class ReportSpec:
    safety_metric: str | None = None  # default: the first safety/<suite>/refusal_rate
    overrefusal_metric: str | None = None  # default: the first overrefusal/<suite>/compliance_rate_safe
    utility_metric: str | None = None  # default: the first utility/<suite>/accuracy (or exact_match)
    reference_method: str | None = None  # significance marks compare methods with this one (default: first)


@dataclass
class Study:
    name: str  # MLflow experiment
    models: list[ModelSpec]
    sample_sizes: list[int]
    seeds: list[int]
    train: TrainSpec
    merge: MergeSpec | None = None
    evaluate: EvaluateSpec | None = None
    compare: CompareSpec | None = None
    description: str = ""
    on_failure: str = "stop"  # stop | continue
    workers: int = 1
    output_root: str = "outputs"
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    selection: SelectionSpec | None = None  # tune each method family on validation, test the choice
    source: str = ""  # the YAML file (set by load_study)

    def __post_init__(self):
        if self.on_failure not in ("stop", "continue"):
            raise ConfigError(f"{self.source}: on_failure must be stop or continue, got {self.on_failure!r}")
        if self.workers < 1:
            raise ConfigError(f"{self.source}: workers must be >= 1, got {self.workers}")
        for name, values in (("sample_sizes", self.sample_sizes), ("seeds", self.seeds)):
            if not values or len(set(values)) != len(values) or not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{self.source}: {name} must be a non-empty list of distinct integers, got {values}")
        if any(n <= 0 for n in self.sample_sizes):
            raise ConfigError(f"{self.source}: sample_sizes must be positive")
        bad = set(self.train.sample_size_roles) - {"utility", "safety"}
        if bad:
            raise ConfigError(f"{self.source}: train.sample_size_roles: unknown roles {sorted(bad)}")
        if self.merge is not None:
            if "method" in self.merge.args:
                raise ConfigError(f"{self.source}: merge.args sets method; give each method in merge.methods")
            labels = [m.name for m in self.merge.methods]
            if not labels or len(set(labels)) != len(labels):
                raise ConfigError(f"{self.source}: merge.methods need distinct names, got {labels}")
        if self.evaluate is not None:
            bad = set(self.evaluate.roles) - set(ROLES_EVAL)
            if bad:
                raise ConfigError(f"{self.source}: evaluate.roles: unknown {sorted(bad)}; known {ROLES_EVAL}")
            if "merged" in self.evaluate.roles and self.merge is None:
                raise ConfigError(f"{self.source}: evaluate.roles has merged but the study has no merge section")
        if self.compare is not None:
            if self.evaluate is None:
                raise ConfigError(f"{self.source}: compare needs an evaluate section")
            for pair in self.compare.pairs:
                if len(pair) != 2 or not set(pair) <= set(self.evaluate.roles) or pair[0] == pair[1] \
                        or pair[1] == "merged":
                    raise ConfigError(f"{self.source}: compare.pairs entry {pair} must be [candidate, reference], "
                                      f"two different evaluated roles of {self.evaluate.roles} (reference not merged)")
        for where, args in self._all_args():
            clash = RESERVED_ARGS & set(args)
            if clash:
                raise ConfigError(f"{self.source}: {where} sets {sorted(clash)}; the sweep sets these itself")
            for key, value in args.items():
                if isinstance(value, dict):
                    raise ConfigError(f"{self.source}: {where}.{key} is a mapping; overrides must be scalars or lists")
        for where, path in self._all_files():
            if not _repo_path(path).is_file():
                raise ConfigError(f"{self.source}: {where}: config file {path} does not exist "
                                  "(paths are relative to the repository root)")
        # the report's rows are the methods, or the tuned families in a study with a selection
        rows = list(self.selection.families) if self.selection is not None else \
            [m.name for m in self.merge.methods] if self.merge else []
        if self.report.reference_method and self.merge and self.report.reference_method not in rows:
            where = "selection.families" if self.selection is not None else "merge.methods"
            raise ConfigError(f"{self.source}: report.reference_method {self.report.reference_method!r} "
                              f"is not one of {where} {rows}")
        labels = [model_label(m) for m in self.models]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{self.source}: models need distinct names, got {labels}")
        if self.selection is not None:
            if self.merge is None or self.evaluate is None or not {"merged", "utility"} <= set(self.evaluate.roles):
                raise ConfigError(f"{self.source}: selection needs merge and evaluate sections with the merged and "
                                  "utility roles evaluated")
            try:
                self.selection.check([m.name for m in self.merge.methods], self.source)
            except SelectionError as exc:
                raise ConfigError(str(exc)) from None
            if "split" in self.evaluate.args:
                raise ConfigError(f"{self.source}: evaluate.args sets split; with a selection section the sweep "
                                  "evaluates candidates on validation and chosen settings on test")

    def _all_args(self):
        yield "train.args", self.train.args
        for sec in ("merge", "evaluate", "compare"):
            if getattr(self, sec) is not None:
                yield f"{sec}.args", getattr(self, sec).args
        for m in self.merge.methods if self.merge else []:
            yield f"merge.methods[{m.name}].args", m.args
        if self.selection is not None:
            yield "selection.validation_args", self.selection.validation_args
            yield "selection.test_args", self.selection.test_args
        for i, model in enumerate(self.models):
            unknown = set(model.args) - set(PIPELINE)
            if unknown:
                raise ConfigError(f"{self.source}: models[{i}].args has unknown stages {sorted(unknown)}")
            for stage, args in model.args.items():
                yield f"models[{i}].args.{stage}", args

    def _all_files(self):
        for i, model in enumerate(self.models):
            for f in model.configs:
                yield f"models[{i}].configs", f
            if model.accelerate_config:
                yield f"models[{i}].accelerate_config", model.accelerate_config
        for role in ("utility", "safety"):
            for f in getattr(self.train, role):
                yield f"train.{role}", f
        if self.train.accelerate_config:
            yield "train.accelerate_config", self.train.accelerate_config
        for sec in ("merge", "evaluate"):
            for f in getattr(getattr(self, sec), "configs", []) if getattr(self, sec) else []:
                yield f"{sec}.configs", f


_NESTED = {(Study, "models"): ModelSpec, (Study, "train"): TrainSpec, (Study, "merge"): MergeSpec,
           (Study, "evaluate"): EvaluateSpec, (Study, "compare"): CompareSpec, (Study, "slurm"): SlurmSpec,
           (Study, "report"): ReportSpec, (MergeSpec, "methods"): MethodSpec, (Study, "selection"): SelectionSpec}


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"source"}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} in {where or 'the study'}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = _NESTED.get((cls, key))
        if sub is not None and isinstance(value, list):
            kwargs[key] = [_build(sub, v, f"{where}{key}[{i}].", source) for i, v in enumerate(value)]
        elif sub is not None and value is not None:
            kwargs[key] = _build(sub, value, f"{where}{key}.", source)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs, **({"source": source} if cls is Study else {}))
    except TypeError as exc:
        raise ConfigError(f"{source}: {where or 'study'}: {exc}") from None


def load_study(path: str | Path, *, name: str | None = None) -> Study:
    """Read and validate a study YAML; ``name`` overrides its ``name`` (the MLflow experiment)."""
    data = read_yaml(path)
    if name:
        data["name"] = name
    return _build(Study, data, "", str(path))


def _repo_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def base_model_path(model: ModelSpec) -> str:
    merged = merge_config_files([_repo_path(f) for f in model.configs])
    name = merged.get("model_name_or_path")
    if not name:
        raise ConfigError(f"model configs {model.configs} set no model_name_or_path")
    return str(name)


def model_label(model: ModelSpec) -> str:
    return model.name or Path(base_model_path(model)).name


# ------------------------------------------------------------------------------------- grid
@dataclass
class Node:
    """One stage run of the plan (a seed of one config)."""

    id: str
    stage: str
    role: str  # train: utility|safety; merge: merged; evaluate: base|utility|safety|merged; compare: <cand>_vs_<ref>
    model: str
    seed: int
    sample_size: int | None
    method: str | None
    configs: list[str]
    args: dict[str, Any]
    upstream: dict[str, str]  # CLI flag -> upstream node id
    accelerate_config: str | None = None
    key: str = ""

    def labels(self) -> dict[str, str]:
        """The ``sweep.*`` tags of its run."""
        return {"sweep.node": self.id, "sweep.key": self.key, "sweep.seed": str(self.seed),
                "sweep.model": self.model, "sweep.role": self.role,
                "sweep.sample_size": "none" if self.sample_size is None else str(self.sample_size),
                "sweep.method": self.method or "none"}


def node_key(stage: str, configs: list[str], args: Mapping[str, Any], upstream_keys: Mapping[str, str]) -> str:
    """Seed-free identity: stage, merged config files + overrides, upstream identities."""
    resolved = merge_config_files([_repo_path(f) for f in configs])
    resolved.update(args)
    blob = json.dumps({"stage": stage, "script": STAGE_SPECS[stage].script, "config": resolved,
                       "upstream": dict(upstream_keys)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_nodes(study: Study, model: ModelSpec, seed: int, n: int | None) -> dict[str, Node]:
    """The utility and safety train nodes of one model x seed x sample size (``n`` applies to the roles
    in ``train.sample_size_roles``; the others train on their config's data)."""
    label = model_label(model)
    accel = model.accelerate_config or study.train.accelerate_config
    out = {}
    for role in ("utility", "safety"):
        size = n if role in study.train.sample_size_roles else None
        args = {**study.train.args, **model.args.get("train", {})}
        if size is not None:
            args["sample_size"] = size
        sid = f"-n{size}" if size is not None else ""
        out[role] = Node(f"train-{role}-{label}{sid}-s{seed}", "train", role, label, seed, size, None,
                         [*model.configs, *getattr(study.train, role)], args, {}, accelerate_config=accel)
    return out


def expand(study: Study) -> list[Node]:
    """The whole grid, deduplicated, in dependency order."""
    if study.selection is not None:
        from sst_lab.tracking.selection_plan import expand_selected

        return expand_selected(study)
    nodes: dict[str, Node] = {}

    def add(node: Node) -> str:
        node.key = node_key(node.stage, node.configs, node.args,
                            {flag: nodes[up].key for flag, up in node.upstream.items()})
        old = nodes.get(node.id)
        if old is not None and old.key != node.key:
            raise ConfigError(f"{study.source}: two different runs would be named {node.id!r}")
        nodes.setdefault(node.id, node)
        return node.id

    ev, cmp_ = study.evaluate, study.compare
    eval_roles = set(ev.roles) if ev else set()
    for model in study.models:
        label, base = model_label(model), base_model_path(model)
        margs = model.args

        def evaluate(role, seed, n, method=None, upstream=None):
            args = {**ev.args, **margs.get("evaluate", {})}
            if role == "base":
                args["model"] = base
            sid = f"-n{n}" if n is not None else ""
            mid = f"-{_SAFE.sub('_', method)}" if method else ""
            return add(Node(f"evaluate-{role}{mid}-{label}{sid}-s{seed}", "evaluate", role, label, seed, n, method,
                            list(ev.configs), args, {"adapter": upstream} if upstream else {}))

        def compare(cand, ref, seed, n, method=None):
            (crole, cid), (rrole, rid) = cand, ref
            sid = f"-n{n}" if n is not None else ""
            mid = f"-{_SAFE.sub('_', method)}" if method else ""
            args = {**cmp_.args, **margs.get("compare", {})}
            return add(Node(f"compare-{crole}{mid}-vs-{rrole}-{label}{sid}-s{seed}", "compare", f"{crole}_vs_{rrole}",
                            label, seed, n, method, [], args, {"candidate": cid, "reference": rid}))

        for seed in study.seeds:
            evals_seed = {"base": evaluate("base", seed, None)} if "base" in eval_roles else {}
            for n in study.sample_sizes:
                trained, evals = {}, dict(evals_seed)
                for role, node in train_nodes(study, model, seed, n).items():
                    trained[role] = (node.sample_size, add(node))
                    if role in eval_roles:
                        evals[role] = evaluate(role, seed, node.sample_size, upstream=trained[role][1])
                merged_n = n if study.train.sample_size_roles else None
                sid = f"-n{merged_n}" if merged_n is not None else ""
                for method in study.merge.methods if study.merge else []:
                    args = {**study.merge.args, **margs.get("merge", {}), "method": method.method, **method.args}
                    mid = add(Node(f"merge-{_SAFE.sub('_', method.name)}-{label}{sid}-s{seed}", "merge", "merged",
                                   label, seed, merged_n, method.name, list(study.merge.configs), args,
                                   {"utility_adapter": trained["utility"][1], "safety_adapter": trained["safety"][1]}))
                    if "merged" in eval_roles:
                        eid = evaluate("merged", seed, merged_n, method.name, mid)
                        for crole, rrole in cmp_.pairs if cmp_ else []:
                            if crole == "merged":
                                compare(("merged", eid), (rrole, evals[rrole]), seed, merged_n, method.name)
                for crole, rrole in cmp_.pairs if cmp_ else []:
                    if crole != "merged":
                        sizes = [trained[r][0] for r in (crole, rrole) if r in trained and trained[r][0] is not None]
                        compare((crole, evals[crole]), (rrole, evals[rrole]), seed, sizes[0] if sizes else None)
    return list(nodes.values())


# ------------------------------------------------------------------------------------ store
@dataclass
class Attempt:
    run_id: str
    status: str
    config_id: str
    host: str
    pid: str
    start_time: int
    error: str = ""


class Store:
    """The study's runs in the tracking store, indexed by (sweep.key, seed)."""

    def __init__(self, uri: str, study: str, *, create: bool = True):
        import mlflow

        from sst_lab.tracking.run import ensure_experiment

        self.uri, self.study = uri, study
        self.experiment_id: str | None = None
        db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
        if not create and db is not None and not Path(db).exists():
            return  # a dry run creates nothing, not even an empty sqlite file
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if create:
            self.experiment_id = ensure_experiment(uri, study)
        else:
            exp = self.client.get_experiment_by_name(study)
            self.experiment_id = exp.experiment_id if exp is not None else None

    def attempts(self) -> dict[tuple[str, str], list[Attempt]]:
        from mlflow.entities import ViewType

        out: dict[tuple[str, str], list[Attempt]] = {}
        if self.experiment_id is None:
            return out
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string="tags.`sweep.key` LIKE '%'",
                                           run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            for r in page:
                t = r.data.tags
                out.setdefault((t["sweep.key"], t.get("sweep.seed", t.get("seed", ""))), []).append(Attempt(
                    r.info.run_id, r.info.status, t.get("config_id", ""), t.get("host", ""), t.get("pid", ""),
                    r.info.start_time or 0, t.get("error", "")))
            token = page.token
            if not token:
                break
        for runs in out.values():
            runs.sort(key=lambda a: run_order(a.start_time, a.run_id))
        return out

    def node_attempts(self, node: "Node") -> list[Attempt]:
        """The runs of one node (key, seed), freshly read: what another sweep did since the plan."""
        runs = self.client.search_runs([self.experiment_id], max_results=1000,
                                       filter_string=f"tags.`sweep.key` = '{node.key}' and "
                                                     f"tags.`sweep.seed` = '{node.seed}'")
        out = [Attempt(r.info.run_id, r.info.status, r.data.tags.get("config_id", ""), r.data.tags.get("host", ""),
                       r.data.tags.get("pid", ""), r.info.start_time or 0, r.data.tags.get("error", "")) for r in runs]
        return sorted(out, key=lambda a: run_order(a.start_time, a.run_id))

    def run_status(self, run_id: str) -> tuple[str, dict[str, str]]:
        run = self.client.get_run(run_id)
        return run.info.status, dict(run.data.tags)

    def mark_abandoned(self, run_id: str, why: str) -> None:
        """A RUNNING run whose process is gone: end it FAILED (never delete), say why."""
        self.client.set_tag(run_id, "error", why)
        self.client.set_terminated(run_id, status="FAILED")


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------- plan
@dataclass
class Step:
    node: Node
    action: str  # reuse | run | blocked (upstream will not be available) | elsewhere (RUNNING, maybe alive)
    run_id: str | None = None  # the reused run
    previous: list[Attempt] = field(default_factory=list)  # earlier attempts that did not finish
    stale: list[Attempt] = field(default_factory=list)  # RUNNING runs to mark FAILED before running
    note: str = ""


def make_plan(nodes: list[Node], attempts: Mapping[tuple[str, str], list[Attempt]], *,
              stages: set[str] | None = None, rerun_running: bool = False) -> list[Step]:
    """Decide per node: reuse a FINISHED run, run it, or not (blocked, excluded stage, running elsewhere)."""
    host = socket.gethostname()
    steps: dict[str, Step] = {}
    for node in nodes:
        runs = attempts.get((node.key, str(node.seed)), [])
        finished = [a for a in runs if a.status == "FINISHED"]
        running = [a for a in runs if a.status == "RUNNING"]
        step = Step(node, "run", previous=[a for a in runs if a.status not in ("FINISHED", "RUNNING")])
        if finished:
            step.action, step.run_id = "reuse", finished[0].run_id
            if len(finished) > 1:
                step.note = f"{len(finished)} FINISHED runs; reusing {finished[0].run_id} ({DUPLICATE_RULE})"
            ids = {a.config_id for a in finished}
            if len(ids) > 1:
                step.note += f" config_id differs between them: {sorted(ids)}"
        elif running:
            alive = [a for a in running if a.host != host or _pid_alive(a.pid)]
            if alive and not rerun_running:
                step.action = "elsewhere"
                step.note = "RUNNING: " + ", ".join(f"{a.run_id} on {a.host} pid {a.pid}" for a in alive)
            else:
                step.stale = running
        ups = [steps[u] for u in node.upstream.values()]
        if step.action == "run" and stages is not None and node.stage not in stages:
            step.action, step.note = "blocked", f"stage {node.stage} not selected and no FINISHED run"
        if step.action in ("run", "elsewhere") and any(u.action in ("blocked", "elsewhere") for u in ups):
            bad = [u.node.id for u in ups if u.action in ("blocked", "elsewhere")]
            step.action, step.note = "blocked", f"waits for {', '.join(bad)}"
        steps[node.id] = step
    return list(steps.values())


class PlanError(ValueError):
    """The plan cannot do what was asked (e.g. a --node whose upstream runs have not finished)."""


def single_node_plan(plan: list[Step], node_id: str) -> list[Step]:
    """The plan for one node (a Slurm job): its upstream nodes must be reused, it runs or is reused."""
    steps = {s.node.id: s for s in plan}
    if node_id not in steps:
        raise PlanError(f"--node {node_id!r} is not in the study; nodes: {', '.join(list(steps)[:8])}, ...")
    step = steps[node_id]
    ups = [steps[u] for u in step.node.upstream.values()]
    missing = [u.node.id for u in ups if u.action != "reuse"]
    if missing:
        raise PlanError(f"--node {node_id}: upstream node(s) {missing} have no FINISHED run yet")
    if step.action in ("blocked", "elsewhere"):
        raise PlanError(f"--node {node_id}: {step.action}: {step.note}")
    return [*ups, step]


def describe_plan(plan: list[Step], ctx: "Context") -> str:
    """Human-readable plan: what is reused, what runs (with its command), what cannot run."""
    lines = [f"study {ctx.study!r}  store {redact_text(ctx.uri)}  workers {ctx.workers}"]
    for step in plan:
        n = step.node
        head = {"reuse": f"reuse {step.run_id}", "run": "run", "blocked": "blocked",
                "elsewhere": "running elsewhere"}[step.action]
        lines.append(f"[{head}] {n.id}  (key {n.key})" + (f"  -- {step.note}" if step.note else ""))
        for a in step.previous:
            lines.append(f"    earlier attempt {a.run_id} {a.status}" + (f": {a.error[:200]}" if a.error else ""))
        for a in step.stale:
            lines.append(f"    stale RUNNING {a.run_id} (host {a.host} pid {a.pid} gone): will be marked FAILED")
        if step.action == "run":
            ups = {u: f"<run id of {u}>" for u in n.upstream.values()}
            cmd = command(n, ups, output_dir=f"{ctx.output_root}/{n.id}-<attempt>", study=ctx.study)
            lines.append("    " + redact_text(shlex.join(cmd)))
    counts = {a: sum(s.action == a for s in plan) for a in ("reuse", "run", "blocked", "elsewhere")}
    lines.append("plan: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- execute
def _render_args(args: Mapping[str, Any]) -> list[str]:
    out = []
    for key, value in args.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def command(node: Node, upstream_ids: Mapping[str, str], *, output_dir: str, study: str,
            python: str = sys.executable) -> list[str]:
    """The stage's command line (the tracking URI travels in the environment, never in argv)."""
    spec = STAGE_SPECS[node.stage]
    cmd = [python]
    if node.accelerate_config:
        cmd += ["-m", "accelerate.commands.launch", "--config_file", node.accelerate_config]
    cmd.append(spec.script)
    for f in node.configs:
        cmd += ["--config", f]
    cmd += _render_args(node.args)
    grouped: dict[str, list[str]] = {}  # "candidates#0", "candidates#1" -> one --candidates id id
    for flag, up in node.upstream.items():
        grouped.setdefault(flag.split("#")[0], []).append(upstream_ids[up])
    for flag, ids in grouped.items():
        cmd += [f"--{flag}", *ids]
    cmd += ["--seed", str(node.seed)]
    if spec.output_dir:
        cmd += ["--output_dir", output_dir]
    cmd += ["--study", study]
    return cmd


@dataclass
class Context:
    study: str
    uri: str
    output_root: Path  # <root>/<study>
    workers: int = 1
    on_failure: str = "stop"
    sweep_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    echo: Callable[[str], None] = print


@dataclass
class Outcome:
    node: str
    status: str  # reused | finished | failed | blocked | not_started | interrupted | elsewhere
    run_id: str | None = None
    seconds: float | None = None
    log: str | None = None
    error: str = ""


def child_env(node: Node, ctx: Context) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", RUN_TAGS_ENV)}
    env.update(MLFLOW_TRACKING_URI=ctx.uri, PYTHONUNBUFFERED="1",
               **{RUN_TAGS_ENV: json.dumps({**node.labels(), "sweep.id": ctx.sweep_id})})
    # N workers share the cores: oversubscribed torch threads cost far more than they give
    # (measured here: 2 workers x 2 threads on 2 cores was several times slower than 1 thread each)
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, ctx.workers)))
    return env


class _Children:
    """Running stage processes, so a signal can be forwarded to each one's process group."""

    def __init__(self):
        self.lock, self.procs, self.stopping = threading.Lock(), {}, False

    def add(self, key: str, proc: subprocess.Popen) -> bool:
        with self.lock:
            if self.stopping:
                return False
            self.procs[key] = proc
            return True

    def remove(self, key: str) -> None:
        with self.lock:
            self.procs.pop(key, None)

    def terminate_all(self) -> None:
        """SIGTERM every stage's process group; a second call (a second Ctrl-C) sends SIGKILL."""
        with self.lock:
            sig = signal.SIGKILL if self.stopping else signal.SIGTERM
            self.stopping = True
            procs = list(self.procs.values())
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass


def _run_node(node: Node, upstream_ids: dict[str, str], ctx: Context, store: Store, children: _Children) -> Outcome:
    attempt = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    out_dir = ctx.output_root / f"{node.id}-{attempt}"
    log_path = ctx.output_root / "logs" / f"{node.id}-{attempt}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(node, upstream_ids, output_dir=str(out_dir), study=ctx.study)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + redact_text(shlex.join(cmd)) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(node, ctx), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        if not children.add(node.id, proc):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait()
            _wait_group(proc.pid)  # `accelerate launch` may die first and leave its worker running
        finally:
            children.remove(node.id)
    seconds = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    ids = _RUN_ID_LINE.findall(text)
    run_id = ids[-1] if ids else _find_run(store, node, ctx.sweep_id)
    status = error = ""
    if run_id:
        status, tags = store.run_status(run_id)
        error = tags.get("error", "")
    if rc == 0 and run_id and status == "FINISHED":
        return Outcome(node.id, "finished", run_id, seconds, str(log_path))
    tail = "\n".join(text.strip().splitlines()[-15:])
    why = error or f"exit code {rc}" + ("" if run_id else ", no run recorded") + f"; log tail:\n{tail}"
    kind = "interrupted" if children.stopping else "failed"
    return Outcome(node.id, kind, run_id, seconds, str(log_path), redact_text(why))


def _group_alive(pgid: int) -> bool:
    """Is any non-zombie process of this process group left?"""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        fields = proc_stat(stat)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group(pgid: int) -> None:
    while _group_alive(pgid):
        time.sleep(0.5)


def _find_run(store: Store, node: Node, sweep_id: str) -> str | None:
    """The run a crashed stage opened (it printed no run id), found by its sweep labels."""
    if store.experiment_id is None:
        return None
    runs = store.client.search_runs([store.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                    filter_string=f"tags.`sweep.key` = '{node.key}' and tags.`sweep.seed` = "
                                                  f"'{node.seed}' and tags.`sweep.id` = '{sweep_id}'")
    return runs[0].info.run_id if runs else None


# ----------------------------------------------------------------------------------- claims
CLAIM_HEARTBEAT_SECONDS = 15.0
CLAIM_STALE_ENV = "SST_LAB_CLAIM_STALE_SECONDS"  # a claim whose heartbeat is older is stale (default 120)


def claims_experiment(study: str) -> str:
    return f"{study}.sweep-claims"


class Claims:
    """Which sweep runs which node, so that two sweeps of one study never start a node twice.

    A claim is a RUNNING run in the experiment ``<study>.sweep-claims`` tagged with the node's
    ``sweep.key``/``sweep.seed``, the sweep's id, host and pid, and a ``claim.heartbeat`` (epoch
    seconds) that a thread of the sweep renews every 15 s. Claiming is create-then-check, which
    needs only read-after-write consistency (sqlite, PostgreSQL, an mlflow server): a sweep creates
    its claim, then lists the node's live claims; it holds the node only if its claim is the only
    one, else it withdraws its claim (KILLED) and tries again later. Two sweeps can both withdraw,
    never both hold. A claim is stale, and is ended FAILED with the reason, when its sweep process
    is gone (same host, dead pid) or its heartbeat is older than ``$SST_LAB_CLAIM_STALE_SECONDS``
    (120; across hosts this compares clocks). A claim ends FINISHED once its node's stage has ended,
    whatever the stage's outcome.
    """

    def __init__(self, store: Store, sweep_id: str):
        from sst_lab.tracking.run import ensure_experiment

        self.client, self.sweep_id = store.client, sweep_id
        self.experiment_id = ensure_experiment(store.uri, claims_experiment(store.study))
        self.host, self.pid = socket.gethostname(), str(os.getpid())
        self.stale_seconds = float(os.environ.get(CLAIM_STALE_ENV, "120"))
        self.held: dict[str, str] = {}  # node id -> claim run id
        self.lock, self.closed = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="sst-lab-claims")
        self.thread.start()

    def stale(self, run: Any) -> str:
        """Why a RUNNING claim is stale ('' when it is live)."""
        t = run.data.tags
        if t.get("host") == self.host and not _pid_alive(t.get("pid", "")):
            return f"stale claim: sweep {t.get('sweep.id')} (pid {t.get('pid')} on {self.host}) is gone"
        age = time.time() - float(t.get("claim.heartbeat", "0"))
        if age > self.stale_seconds:
            return (f"stale claim: sweep {t.get('sweep.id')} on {t.get('host')} sent no heartbeat for {age:.0f} s "
                    f"(> ${CLAIM_STALE_ENV} = {self.stale_seconds:g})")
        return ""

    def live(self, node: Node) -> list[Any]:
        """The node's live claims; stale ones are ended FAILED on the way."""
        runs = self.client.search_runs([self.experiment_id], max_results=1000,
                                       filter_string=f"tags.`sweep.key` = '{node.key}' and tags.`sweep.seed` = "
                                                     f"'{node.seed}' and attributes.status = 'RUNNING'")
        out = []
        for run in runs:
            why = self.stale(run)
            if not why:
                out.append(run)
                continue
            self.client.set_tag(run.info.run_id, "error", why)
            self.client.set_terminated(run.info.run_id, status="FAILED")
        return out

    def acquire(self, node: Node) -> str:
        """Claim ``node``: '' when this sweep now holds it, else who holds it."""
        tags = {"sweep.key": node.key, "sweep.seed": str(node.seed), "sweep.node": node.id,
                "sweep.id": self.sweep_id, "host": self.host, "pid": self.pid, "claim.heartbeat": f"{time.time():.3f}"}
        mine = self.client.create_run(self.experiment_id, run_name=f"claim-{node.id}", tags=tags).info.run_id
        others = [r for r in self.live(node) if r.info.run_id != mine]
        if others:
            self.client.set_terminated(mine, status="KILLED")
            return "claimed at the same time by " + ", ".join(self.describe(r) for r in others)
        with self.lock:
            self.held[node.id] = mine
        return ""

    @staticmethod
    def describe(run: Any) -> str:
        t = run.data.tags
        return f"sweep {t.get('sweep.id')} on {t.get('host')} pid {t.get('pid')}"

    def release(self, node_id: str, status: str = "FINISHED") -> None:
        with self.lock:
            run_id = self.held.pop(node_id, None)
        if run_id is not None:
            self.client.set_terminated(run_id, status=status)

    def _beat(self) -> None:
        while not self.closed.wait(CLAIM_HEARTBEAT_SECONDS):
            with self.lock:
                held = list(self.held.values())
            for run_id in held:
                try:
                    self.client.set_tag(run_id, "claim.heartbeat", f"{time.time():.3f}")
                except Exception as exc:  # noqa: BLE001 - the next beat retries; say so
                    print(f"[sweep] claim heartbeat of {run_id} failed: {redact_text(str(exc))[:300]}",
                          file=sys.stderr)

    def close(self) -> None:
        """Stop the heartbeat; claims still held (an interrupted sweep) end KILLED."""
        self.closed.set()
        for node_id in list(self.held):
            self.release(node_id, status="KILLED")


def _take_node(step: Step, store: Store, claims: Claims) -> tuple[str, str]:
    """Just before a node would start, look at the store again and claim it. Returns
    ``("reuse", run_id)`` when a FINISHED run appeared since the plan (another sweep ran it),
    ``("wait", why)`` while another sweep's live claim holds it, ``("elsewhere", why)`` for a live
    RUNNING stage run that no sweep claims (what the planner skips too), ``("run", "")`` once this
    sweep holds the node's claim."""
    host, planned = socket.gethostname(), {a.run_id for a in step.stale}
    for check in ("before", "after"):  # after claiming, look again: the holder may just have finished
        runs = store.node_attempts(step.node)
        finished = [a for a in runs if a.status == "FINISHED"]
        if finished:
            claims.release(step.node.id)
            return "reuse", finished[0].run_id
        alive = [a for a in runs if a.status == "RUNNING" and a.run_id not in planned
                 and (a.host != host or _pid_alive(a.pid))]
        if check == "before":
            holders = claims.live(step.node)
            if holders:
                return "wait", "claimed by " + ", ".join(claims.describe(r) for r in holders)
        if alive:
            claims.release(step.node.id, status="KILLED")
            return "elsewhere", "RUNNING: " + ", ".join(f"{a.run_id} on {a.host} pid {a.pid}" for a in alive)
        if check == "before":
            holder = claims.acquire(step.node)
            if holder:
                return "wait", holder
    return "run", ""


CLAIM_RETRY_SECONDS = 2.0


def _may_wait(plan: list[Step]) -> set[str]:
    """Nodes the plan found RUNNING elsewhere, and nodes blocked only by such nodes: at run time they
    are waited for while another sweep's live claim holds them (and reused once FINISHED), and
    skipped as ``elsewhere`` only when no sweep claims the RUNNING stage (see :func:`_take_node`)."""
    ok, out = {s.node.id for s in plan if s.action in ("run", "reuse")}, set()
    for step in plan:  # dependency order
        ups = set(step.node.upstream.values())
        if step.action == "elsewhere" or (step.action == "blocked" and step.note.startswith("waits for")
                                          and ups <= ok | out):
            out.add(step.node.id)
    return out


def execute(plan: list[Step], ctx: Context, store: Store) -> list[Outcome]:
    """Run the plan's ``run`` steps with ``ctx.workers`` processes; see the module docstring."""
    outcomes: dict[str, Outcome] = {}
    run_ids: dict[str, str] = {}
    may_wait = _may_wait(plan)
    for step in plan:
        if step.action == "reuse":
            outcomes[step.node.id] = Outcome(step.node.id, "reused", step.run_id)
            run_ids[step.node.id] = output_run_id(store, step.node, step.run_id)
        elif step.action in ("blocked", "elsewhere") and step.node.id not in may_wait:
            outcomes[step.node.id] = Outcome(step.node.id, step.action, error=step.note)
    order = {s.node.id: i for i, s in enumerate(plan)}  # earlier stages first: training unlocks the most work
    pending = sorted((s for s in plan if s.action == "run" or s.node.id in may_wait),
                     key=lambda s: (SCHEDULE[s.node.stage], order[s.node.id]))
    children, stop = _Children(), threading.Event()
    interrupted: list[int] = []
    claims = Claims(store, ctx.sweep_id) if pending else None
    retry_at: dict[str, float] = {}  # nodes another sweep holds: when to look again

    def on_signal(signum, _frame):
        interrupted.append(signum)
        stop.set()
        children.terminate_all()

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    running: dict[cf.Future, Step] = {}
    try:
        with cf.ThreadPoolExecutor(max_workers=ctx.workers) as pool:
            while pending or running:
                failed = {k for k, o in outcomes.items() if o.status in ("failed", "blocked", "interrupted",
                                                                         "elsewhere")}
                changed = False
                for step in list(pending):
                    ups = set(step.node.upstream.values())
                    if ups & failed:
                        pending.remove(step)
                        bad = sorted(ups & failed)
                        outcomes[step.node.id] = Outcome(step.node.id, "blocked", error=f"upstream failed: {bad}")
                        failed.add(step.node.id)
                        retry_at.pop(step.node.id, None)
                    elif not stop.is_set() and len(running) < ctx.workers and ups <= set(run_ids):
                        if time.monotonic() < retry_at.get(step.node.id, 0.0):
                            continue
                        action, why = _take_node(step, store, claims)
                        if action == "wait":
                            if step.node.id not in retry_at:
                                ctx.echo(f"[sweep] wait {step.node.id}: {why}")
                            retry_at[step.node.id] = time.monotonic() + CLAIM_RETRY_SECONDS * (1 + random.random())
                            continue
                        pending.remove(step)
                        retry_at.pop(step.node.id, None)
                        changed = True
                        if action == "reuse":
                            outcomes[step.node.id] = Outcome(step.node.id, "reused", why)
                            run_ids[step.node.id] = why
                            ctx.echo(f"[sweep] reuse {step.node.id}: run {why} was run by another sweep")
                            continue
                        if action == "elsewhere":
                            outcomes[step.node.id] = Outcome(step.node.id, "elsewhere", error=why)
                            failed.add(step.node.id)
                            ctx.echo(f"[sweep] elsewhere {step.node.id}: {why}")
                            continue
                        for a in step.stale:
                            store.mark_abandoned(a.run_id, f"abandoned: process {a.pid} on {a.host} is gone; "
                                                           f"rerun by sweep {ctx.sweep_id}")
                        ctx.echo(f"[sweep] start {step.node.id}")
                        fut = pool.submit(_run_node, step.node, {u: run_ids[u] for u in ups}, ctx, store, children)
                        running[fut] = step
                if stop.is_set() and not running:
                    break
                if not running:
                    if not retry_at and not changed:
                        break  # nothing runnable is left (dependencies can no longer be met)
                    time.sleep(0.5 if retry_at else 0.0)  # another sweep holds what is left: wait for it
                    continue
                done, _ = cf.wait(list(running), timeout=1.0, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    step = running.pop(fut)
                    claims.release(step.node.id)
                    try:
                        out = fut.result()
                    except Exception as exc:  # the launcher itself failed (bad script path, store down...)
                        out = Outcome(step.node.id, "failed", error=redact_text(f"{type(exc).__name__}: {exc}"))
                    outcomes[out.node] = out
                    took = f" in {out.seconds:.0f}s" if out.seconds is not None else ""
                    ctx.echo(f"[sweep] {out.status} {out.node}{took}" + (f" run {out.run_id}" if out.run_id else "")
                             + (f"\n{out.error}" if out.status == "failed" else ""))
                    if out.status == "finished":
                        try:
                            run_ids[out.node] = output_run_id(store, step.node, out.run_id)
                        except ConfigError as exc:
                            outcomes[out.node] = Outcome(out.node, "failed", out.run_id, out.seconds, out.log, str(exc))
                            if ctx.on_failure == "stop":
                                stop.set()
                    elif out.status == "failed" and ctx.on_failure == "stop":
                        stop.set()
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        if claims is not None:
            claims.close()
    for step in pending:
        outcomes.setdefault(step.node.id, Outcome(step.node.id, "not_started",
                                                  error="sweep interrupted" if interrupted else "sweep stopped"))
    if interrupted:
        raise SweepInterrupted(interrupted[0], [outcomes[s.node.id] for s in plan])
    return [outcomes[s.node.id] for s in plan]


def output_run_id(store: Store, node: Node, run_id: str) -> str:
    """The run id a node hands its dependents: a select run hands on the merge run it chose."""
    if node.stage != "select":
        return run_id
    chosen = store.run_status(run_id)[1].get("select.chosen_merge_run_id")
    if not chosen:
        raise ConfigError(f"select run {run_id} ({node.id}) has no select.chosen_merge_run_id tag")
    return chosen


class SweepInterrupted(Exception):
    def __init__(self, signum: int, outcomes: list[Outcome]):
        super().__init__(f"sweep interrupted by {signal.Signals(signum).name}")
        self.signum, self.outcomes = signum, outcomes


def summarize(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines = ["sweep: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))]
    for o in outcomes:
        if o.status in ("failed", "interrupted", "blocked", "elsewhere"):
            first = o.error.splitlines()[0] if o.error else ""
            lines.append(f"  {o.status}: {o.node}" + (f" (run {o.run_id})" if o.run_id else "") + f": {first}"
                         + (f"  log: {o.log}" if o.log else ""))
    return "\n".join(lines)


def write_summary(outcomes: list[Outcome], ctx: Context) -> Path:
    from sst_lab.io import write_json_atomic

    path = ctx.output_root / "sweeps" / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{ctx.sweep_id}.json"
    write_json_atomic(path, {"study": ctx.study, "sweep_id": ctx.sweep_id, "store": redact_text(ctx.uri),
                             "outcomes": [dataclasses.asdict(o) for o in outcomes]})
    return path


# ------------------------------------------------------------------------------------ slurm
_LOCAL_STORES = ("sqlite:", "file:", "/", ".")


def emit_slurm(plan: list[Step], study: Study, study_file: str, ctx: Context, out_dir: Path, *,
               allow_local_store: bool = False) -> Path:
    """One sbatch script per node to run, plus ``submit.sh`` chaining them with ``afterok``.

    Each job runs ``tracking/sweep.py --node <id>``, which looks its upstream run ids up in the
    store at run time (they do not exist yet when the scripts are written).
    """
    if ctx.uri.startswith(_LOCAL_STORES) and not allow_local_store:
        raise ConfigError(f"--emit_slurm needs a tracking server every job can reach (http://..., postgresql://...), "
                          f"got {redact_text(ctx.uri)}; pass --allow_local_store for one machine with a shared disk")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    run_steps = {s.node.id: s for s in plan if s.action == "run"}
    uri_line = (f"export MLFLOW_TRACKING_URI={shlex.quote(ctx.uri)}" if redact_text(ctx.uri) == ctx.uri else
                ": \"${MLFLOW_TRACKING_URI:?export MLFLOW_TRACKING_URI (it holds credentials, so it is not written here)}\"")
    submit = ["#!/usr/bin/env bash", f"# Submit study {study.name!r}: {len(run_steps)} jobs, each after its upstream jobs.",
              "set -euo pipefail", f"cd {shlex.quote(str(out_dir))}", uri_line, "declare -A JOB"]
    for step in plan:
        if step.node.id not in run_steps:
            continue
        node = step.node
        model = next(m for m in study.models if model_label(m) == node.model)
        opts = {"job-name": f"{study.name}-{node.id}"[:120], "output": str(out_dir / "logs" / f"{node.id}-%j.out"),
                **study.slurm.options, **study.slurm.stage_options.get(node.stage, {}),
                **(model.slurm if node.stage == "train" else {})}
        script = ["#!/usr/bin/env bash", *[f"#SBATCH --{k}={v}" for k, v in opts.items()], "set -euo pipefail",
                  *study.slurm.setup, f"cd {shlex.quote(str(REPO_ROOT))}",
                  "export HF_HUB_DISABLE_PROGRESS_BARS=1",
                  "exec " + shlex.join([sys.executable, "tracking/sweep.py", "--config", str(Path(study_file).resolve()),
                                        "--study", ctx.study, "--output_root", str(ctx.output_root.parent),
                                        "--node", node.id])]
        path = out_dir / f"{node.id}.sbatch"
        path.write_text("\n".join(script) + "\n")
        deps = [u for u in node.upstream.values() if u in run_steps]
        dep = (" --dependency=afterok:" + ":".join(f"${{JOB[{shlex.quote(u)}]}}" for u in deps)) if deps else ""
        submit.append(f"JOB[{shlex.quote(node.id)}]=$(sbatch --parsable{dep} {shlex.quote(path.name)})")
    submit.append('echo "submitted ${#JOB[@]} jobs"')
    path = out_dir / "submit.sh"
    path.write_text("\n".join(submit) + "\n")
    path.chmod(0o755)
    return path


# ------------------------------------------------------------------------------ entry point
def normalise_uri(uri: str) -> str:
    """sqlite paths become absolute, so child stages (cwd = repo root) reach the same store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((Path.cwd() / uri[len("sqlite:///"):]).resolve())
    return uri


def check_server(uri: str, timeout: float = 15.0) -> None:
    """Fail fast on an unreachable tracking server (MLflow's own retries take minutes)."""
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"tracking server {redact_text(uri)} does not answer /health: {exc}") from None


def prepare(study: Study, *, tracking_uri: str | None, output_root: str | None, workers: int | None,
            on_failure: str | None, create: bool = True) -> tuple[Context, Store]:
    uri = normalise_uri(resolve_tracking_uri(tracking_uri))
    check_server(uri)
    root = Path(output_root or study.output_root)
    root = (root if root.is_absolute() else Path.cwd() / root) / _SAFE.sub("_", study.name)
    ctx = Context(study.name, uri, root, workers or study.workers, on_failure or study.on_failure)
    if ctx.on_failure not in ("stop", "continue"):
        raise ConfigError(f"on_failure must be stop or continue, got {ctx.on_failure!r}")
    return ctx, Store(uri, study.name, create=create)
