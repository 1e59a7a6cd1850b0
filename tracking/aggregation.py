"""Aggregate a study over seeds: one ``stage=aggregate`` MLflow run per config group.

A *group* is the FINISHED runs of one stage that share a ``config_id`` (the config hash without
the seed), one run per seed. When a seed was run twice (two sweeps at once before node claims,
a rerun by hand), the rule is the sweep planner's (:data:`DUPLICATE_RULE`): the *earliest* FINISHED
run counts, the others are named in the tag ``aggregate.ignored_run_ids`` and printed. For every metric of the members (per-run
intervals, p-values, ``/n`` counts and per-module merge statistics excepted) the group's aggregate run logs::

    <metric>/mean  <metric>/std  <metric>/n  <metric>/ci_low  <metric>/ci_high     (95 % t-interval)

(``std`` and the interval need two seeds; with one they are omitted and the tag
``aggregate.note`` says so). The interval of a metric that lives in [0, 1] (an evaluate suite's
rates, accuracies, exact match, shares and recalls: :func:`metric_range`) is intersected with
[0, 1], since the mean it covers cannot leave that range (a t-interval over 3 seeds of refusal
rates 0.0, 0.2, 0.8 reaches -0.7); the tag ``aggregate.ci_clipped`` names the metrics where that
changed the interval. Groups of the same stage, role, model and sample size that differ
only in the merge method are compared pairwise across their common seeds: in the aggregate run of
method A, ``paired/<B>/<metric>/{mean,ci_low,ci_high,n,p_value}`` is the mean per-seed difference
A - B with its t-interval and a paired t-test p-value. When all per-seed differences are equal up
to round-off (relative range <= ``CONSTANT_RTOL``) the std is 0, the interval has zero width, no
p-value is logged, and the tag ``aggregate.constant_differences`` names those metrics.

Rerunning reopens the group's existing aggregate run (found by the tags
``aggregate.group_stage`` + ``aggregate.group_config_id``) and updates it: one aggregate per
group, no run deleted. Metrics a previous aggregation logged that this one no longer computes
cannot be deleted from MLflow; they are listed in the tag ``aggregate.stale_metrics``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

AGGREGATED_STAGES = ("train", "merge", "evaluate", "compare")
SKIP_METRIC = re.compile(r"(_ci_low|_ci_high|p_value|/n|/n_[a-z_]+|^system/.*|^merge/module/.*)$")
CONFIDENCE = 0.95
CONSTANT_RTOL = 1e-9  # per-seed differences within this relative range count as constant
COORDS = ("role", "model", "sample_size", "method")
_UNSAFE = re.compile(r"[^/\w.\- ]+")
DUPLICATE_RULE = "earliest FINISHED run of a seed counts"  # the sweep planner reuses the same run
# evaluate metrics that are proportions: rates, accuracies, exact match, shares, per-class recall
UNIT_INTERVAL = re.compile(r"^(safety|utility|overrefusal)/.*(/[a-z_]*rate[a-z_]*|/[a-z_]*accuracy[a-z_]*|"
                           r"/exact_match|/[a-z_]*share|/recall/[^/]+)$")


def run_order(start_time: int | None, run_id: str) -> tuple[int, str]:
    """Order of duplicate runs of one node and seed: the first one is the one that counts, for the
    sweep's reuse (``study.make_plan``), aggregation and the report alike."""
    return (start_time or 0, run_id)


@dataclass
class Member:
    run_id: str
    seed: str
    start_time: int
    tags: dict[str, str]
    metrics: dict[str, float]  # without the metrics of its invalid suites (see valid_metrics)
    invalid_suites: tuple[str, ...] = ()


@dataclass
class Group:
    stage: str
    config_id: str
    members: list[Member]
    coords: dict[str, str]  # role, model, sample_size, method, split
    ignored: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        c = self.coords
        parts = [self.stage, c["role"], c["method"] if c["method"] != "none" else "", c["model"],
                 f"n{c['sample_size']}" if c["sample_size"] != "none" else "", c["split"] if c["split"] != "all" else ""]
        return "-".join(p for p in parts if p)


@dataclass(frozen=True)
class Summary:
    mean: float
    n: int
    std: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    constant: bool = False  # all values equal up to round-off (paired differences only)
    clipped: bool = False  # the t-interval was intersected with the metric's range

    def as_metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/mean": self.mean, f"{prefix}/n": float(self.n)}
        for name in ("std", "ci_low", "ci_high", "p_value"):
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}/{name}"] = value
        return out


def metric_range(name: str) -> tuple[float, float] | None:
    """The range a metric's values (and so their mean) cannot leave, when it has one: [0, 1] for
    the proportions of :data:`UNIT_INTERVAL`; None for anything else (losses, seconds, deltas)."""
    return (0.0, 1.0) if UNIT_INTERVAL.match(name) else None


def summarize(values: Iterable[float], confidence: float = CONFIDENCE,
              bounds: tuple[float, float] | None = None) -> Summary:
    """Mean, sample std (ddof=1), n and the Student-t interval over seeds (spread needs n >= 2),
    the interval intersected with ``bounds`` when given (``clipped`` says it changed)."""
    from sst_lab.evaluate.stats import t_interval

    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"summarize needs finite values, got {arr.tolist()}")
    if arr.size == 1:
        return Summary(mean=float(arr[0]), n=1)
    t = t_interval(arr, confidence)
    low, high = t.low, t.high
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Summary(mean=t.mean, n=t.n, std=t.std, ci_low=low, ci_high=high, clipped=(low, high) != (t.low, t.high))


def clipped_tag(summaries: Mapping[str, Summary]) -> str:
    """The ``aggregate.ci_clipped`` tag: the metrics whose interval :func:`metric_range` cut, or none."""
    return ",".join(sorted(n for n, v in summaries.items() if v.clipped))[:5000] or "none"


def paired_summary(diffs: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean per-seed difference with its t-interval and a two-sided paired t-test p-value.

    Differences that are all equal up to floating-point round-off (spread within ``CONSTANT_RTOL``
    of their magnitude: ``0.3 - 0.2`` and ``0.5 - 0.4`` differ in the 17th digit) are reported as
    what they are: ``constant=True``, std 0 and a zero-width interval at the mean, and no p-value
    (the t statistic is undefined; a round-off std would give p ~ 1e-32).
    """
    from scipy import stats as sps

    arr = np.asarray(list(diffs), dtype=float)
    s = summarize(arr, confidence)
    if s.n < 2:
        return s
    if is_constant(arr):
        mean = float(arr.mean())
        return Summary(mean, s.n, 0.0, mean, mean, None, constant=True)
    p = float(sps.ttest_1samp(arr, 0.0).pvalue)
    return Summary(s.mean, s.n, s.std, s.ci_low, s.ci_high, p if math.isfinite(p) else None)


def holm(p_values: Mapping[Any, float]) -> dict[Any, float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate):
    the i-th smallest of m becomes ``max over j <= i of min(1, (m - j + 1) p_(j))``."""
    order = sorted(p_values, key=lambda k: p_values[k])
    out, running, m = {}, 0.0, len(order)
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return out


def is_constant(values: np.ndarray) -> bool:
    """All values equal up to round-off: their range is within ``CONSTANT_RTOL`` of their size."""
    scale = max(float(np.max(np.abs(values))), np.finfo(float).tiny)
    return float(np.ptp(values)) <= CONSTANT_RTOL * scale


def invalid_suites(tags: Mapping[str, str], metrics: Mapping[str, float]) -> tuple[str, ...]:
    """Suites an evaluate run marked invalid (tag ``invalid_suites``, metric ``<group>/<suite>/valid`` = 0)."""
    named = {s for s in tags.get("invalid_suites", "none").split(",") if s and s != "none"}
    named |= {suite_of(k) for k, v in metrics.items() if k.count("/") == 2 and k.endswith("/valid") and v == 0}
    return tuple(sorted(named))


def suite_of(metric: str) -> str | None:
    """The suite of an evaluate metric ``<group>/<suite>/<name>`` (``time/<suite>/seconds`` too), else None."""
    parts = metric.split("/")
    return parts[1] if len(parts) >= 3 else None


def valid_metrics(metrics: Mapping[str, float], invalid: Iterable[str]) -> dict[str, float]:
    """``metrics`` without every ``<group>/<suite>/...`` (and ``time/<suite>/...``) of an invalid suite: a
    seed whose suite was invalid neither enters that suite's means nor its paired differences."""
    bad = set(invalid)
    return {k: v for k, v in metrics.items() if suite_of(k) not in bad}


def invalid_record(members: Iterable[tuple[str, tuple[str, ...]]]) -> tuple[dict[str, str], dict[str, float]]:
    """The tag ``aggregate.invalid_suites`` (``<suite>:<seed>,<seed>;...`` or ``none``) and the metrics
    ``aggregate/n_invalid_seeds`` and ``aggregate/invalid_seeds/<suite>`` of (seed, invalid suites) pairs."""
    by_suite: dict[str, list[str]] = {}
    n_seeds = 0
    for seed, suites in members:
        n_seeds += bool(suites)
        for suite in suites:
            by_suite.setdefault(suite, []).append(seed)
    tag = ";".join(f"{suite}:{','.join(seeds)}" for suite, seeds in sorted(by_suite.items())) or "none"
    metrics = {"aggregate/n_invalid_seeds": float(n_seeds),
               **{f"aggregate/invalid_seeds/{_metric_name(s)}": float(len(v)) for s, v in by_suite.items()}}
    return {"aggregate.invalid_suites": tag[:5000]}, metrics


def aggregated_metric_names(metrics: Mapping[str, float]) -> list[str]:
    return sorted(m for m in metrics if not SKIP_METRIC.search(m))


# ------------------------------------------------------------------------------- grouping
def coordinates(tags: Mapping[str, str], by_id: Mapping[str, Any]) -> dict[str, str]:
    """Where a run sits in the study: the sweep's labels, else its own tags, else its lineage."""
    model = tags.get("sweep.model") or tags.get("base_model", "none").rstrip("/").rsplit("/", 1)[-1]
    method = tags.get("sweep.method") or tags.get("merge_method")
    if not method or method == "none":
        method = "none"
        for rid in tags.get("upstream_run_ids", "").split(","):
            up = by_id.get(rid)
            if up is not None and up.data.tags.get("stage") == "merge":
                method = up.data.tags.get("sweep.method") or up.data.tags.get("merge_method", "none")
                break
    return {"role": tags.get("sweep.role") or tags.get("role", "none"), "model": model or "none",
            "sample_size": tags.get("sweep.sample_size") or tags.get("sample_size", "none"), "method": method,
            "split": tags.get("split") or "all"}  # evaluate runs of a selection study: validation or test


def build_groups(runs: list[Any]) -> list[Group]:
    """Group FINISHED stage runs by (stage, config_id); keep the earliest run of each seed
    (:data:`DUPLICATE_RULE`)."""
    by_id = {r.info.run_id: r for r in runs}
    buckets: dict[tuple[str, str], list[Any]] = {}
    for r in runs:
        t = r.data.tags
        if r.info.status != "FINISHED" or t.get("stage") not in AGGREGATED_STAGES or not t.get("config_id"):
            continue
        buckets.setdefault((t["stage"], t["config_id"]), []).append(r)
    groups = []
    for (stage, cid), rs in sorted(buckets.items()):
        rs.sort(key=lambda r: run_order(r.info.start_time, r.info.run_id))
        per_seed: dict[str, Any] = {}
        for r in rs:
            per_seed.setdefault(r.data.tags.get("seed", "none"), r)  # the earliest run of a seed counts
        keep = {r.info.run_id for r in per_seed.values()}
        members = []
        for seed, r in sorted(per_seed.items(), key=lambda kv: _seed_order(kv[0])):
            bad = invalid_suites(r.data.tags, r.data.metrics) if stage == "evaluate" else ()
            members.append(Member(r.info.run_id, seed, r.info.start_time or 0, dict(r.data.tags),
                                  valid_metrics(r.data.metrics, bad), bad))
        coords = coordinates(members[0].tags, by_id)
        groups.append(Group(stage, cid, members, coords, [r.info.run_id for r in rs if r.info.run_id not in keep]))
    return groups


def _seed_order(seed: str) -> tuple[int, Any]:
    try:
        return (0, int(seed))
    except ValueError:
        return (1, seed)


def group_summaries(group: Group) -> dict[str, Summary]:
    names = sorted({m for mem in group.members for m in aggregated_metric_names(mem.metrics)})
    return {name: summarize([mem.metrics[name] for mem in group.members if name in mem.metrics],
                            bounds=metric_range(name)) for name in names}


def paired_comparisons(groups: list[Group]) -> tuple[dict[str, dict[str, dict[str, Summary]]], list[str]]:
    """For every group with a method: {other method: {metric: paired summary}}, keyed by group label.

    Families are groups of the same stage, role, model, sample size and split (runs on different
    items are never paired); a family where two groups carry the same method label is ambiguous
    and skipped (returned in the second value).
    """
    families: dict[tuple, list[Group]] = {}
    for g in groups:
        if g.coords["method"] != "none":
            c = g.coords
            families.setdefault((g.stage, c["role"], c["model"], c["sample_size"], c["split"]), []).append(g)
    out: dict[str, dict[str, dict[str, Summary]]] = {}
    skipped = []
    for fam, gs in families.items():
        methods = [g.coords["method"] for g in gs]
        if len(set(methods)) != len(methods):
            skipped.append(f"{'/'.join(fam)}: methods {methods} repeat")
            continue
        for a in gs:
            a_by_seed = {m.seed: m.metrics for m in a.members}
            for b in gs:
                if b is a:
                    continue
                common = [m for m in b.members if m.seed in a_by_seed]
                res = {}
                for name in sorted({n for m in a.members for n in aggregated_metric_names(m.metrics)}):
                    diffs = [a_by_seed[m.seed][name] - m.metrics[name] for m in common
                             if name in m.metrics and name in a_by_seed[m.seed]]
                    if diffs:
                        res[name] = paired_summary(diffs)
                out.setdefault(a.label, {})[b.coords["method"]] = res
    return out, skipped


# --------------------------------------------------------------------------------- writing
def study_runs(study: str, tracking_uri: str | None) -> tuple[str, list[Any]]:
    """(resolved tracking URI, every active run of the study's experiment); an error if it has none."""
    import mlflow

    from sst_lab.tracking.run import TrackingError, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise TrackingError(f"study {study!r} has no experiment in {uri}")
    return uri, fetch_runs(client, exp.experiment_id)


def log_metrics_chunked(run: Any, metrics: Mapping[str, float], chunk: int = 500) -> None:
    """An aggregate's many metrics, ``chunk`` per MLflow call."""
    items = list(metrics.items())
    for i in range(0, len(items), chunk):
        run.log_metrics(dict(items[i:i + chunk]))


def fetch_runs(client: Any, experiment_id: str) -> list[Any]:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _metric_name(text: str) -> str:
    return _UNSAFE.sub("_", text)


def aggregate_metrics(summaries: Mapping[str, Summary], paired: Mapping[str, Mapping[str, Summary]],
                      p_holm: Mapping[tuple[str, str], float] | None = None) -> dict[str, float]:
    """MLflow metrics of the summaries and paired summaries; ``p_holm``: (other, metric) -> the
    paired p-value adjusted over its family of comparisons (``paired/<other>/<metric>/p_holm``)."""
    metrics: dict[str, float] = {}
    for name, s in summaries.items():
        metrics.update(s.as_metrics(name))
    for other, res in paired.items():
        for name, s in res.items():
            metrics.update(s.as_metrics(f"paired/{_metric_name(other)}/{name}"))
    for (other, name), p in (p_holm or {}).items():
        metrics[f"paired/{_metric_name(other)}/{name}/p_holm"] = p
    return metrics


def _constant(members: list[Member], key: str) -> str:
    values = {m.tags.get(key, "none") for m in members}
    return values.pop() if len(values) == 1 else "mixed"


def write_aggregates(study: str, tracking_uri: str | None = None, *, echo=print) -> list[tuple[Group, str]]:
    """Write (or update) one aggregate run per group of ``study``; returns (group, run id) pairs."""
    from sst_lab.tracking.run import TrackingError, stage_run

    uri, runs = study_runs(study, tracking_uri)
    existing: dict[tuple[str, str], list[Any]] = {}
    for r in runs:
        t = r.data.tags
        if t.get("stage") == "aggregate" and "aggregate.group_config_id" in t:
            existing.setdefault((t.get("aggregate.group_stage", ""), t["aggregate.group_config_id"]), []).append(r)
    groups = build_groups(runs)
    if not groups:
        raise TrackingError(f"study {study!r} has no FINISHED train/merge/evaluate/compare runs to aggregate")
    paired, skipped = paired_comparisons(groups)
    for note in skipped:
        echo(f"aggregate: no paired comparison for {note}")
    written = []
    for g in groups:
        summaries = group_summaries(g)
        pair = paired.get(g.label, {})
        metrics = aggregate_metrics(summaries, pair)
        inv_tags: dict[str, str] = {}
        if g.stage == "evaluate":  # a seed whose suite was invalid: counted, named, out of that suite's means
            inv_tags, inv_metrics = invalid_record((m.seed, m.invalid_suites) for m in g.members)
            metrics.update(inv_metrics)
        olds = sorted(existing.get((g.stage, g.config_id), []), key=lambda r: r.info.start_time or 0)
        old = olds[0] if olds else None
        stale = sorted(set(old.data.metrics) - set(metrics)) if old is not None else []
        ids = [m.run_id for m in g.members]
        settings = {"group_stage": g.stage, "group_config_id": g.config_id, "confidence": CONFIDENCE,
                    "skipped_metrics": SKIP_METRIC.pattern}
        tags = {"role": g.coords["role"], "base_model": _constant(g.members, "base_model"),
                "sample_size": g.coords["sample_size"], "seed": "all", "upstream_run_ids": ",".join(ids),
                "aggregate.group_stage": g.stage, "aggregate.group_config_id": g.config_id,
                "aggregate.member_run_ids": ",".join(ids), "aggregate.n_members": len(ids),
                "aggregate.seeds": ",".join(m.seed for m in g.members),
                "aggregate.ignored_run_ids": ",".join(g.ignored) or "none",
                "aggregate.duplicate_rule": DUPLICATE_RULE,
                "aggregate.stale_metrics": ",".join(stale)[:5000] or "none",
                "aggregate.note": "one seed: no std or interval" if len(ids) == 1 else "none",
                **{f"aggregate.{k}": v for k, v in g.coords.items()}}
        if g.stage == "merge":
            tags["merge_method"] = _constant(g.members, "merge_method")
        if g.stage == "compare":
            statuses = [m.tags.get("compare/safety_tax_status", "none") for m in g.members]
            tags["aggregate.safety_tax_status"] = ",".join(f"{s}:{statuses.count(s)}" for s in sorted(set(statuses)))
        constant = sorted(f"{o}/{k}" for o, r in pair.items() for k, v in r.items() if v.constant)
        if constant:
            tags["aggregate.constant_differences"] = ",".join(constant)[:5000]
        tags["aggregate.ci_clipped"] = clipped_tag(summaries)
        if len(olds) > 1:
            tags["aggregate.duplicates"] = ",".join(r.info.run_id for r in olds[1:])
        tags.update(inv_tags)
        with stage_run(stage="aggregate", study=study, config={"aggregate": settings}, tags=tags,
                       run_name=f"aggregate-{g.label}", tracking_uri=uri,
                       resume_run_id=old.info.run_id if old is not None else None) as run:
            log_metrics_chunked(run, metrics)
            run.log_json({"group": {"stage": g.stage, "config_id": g.config_id, **g.coords},
                          "members": [{"run_id": m.run_id, "seed": m.seed, "invalid_suites": list(m.invalid_suites)}
                                      for m in g.members],
                          "ignored_run_ids": g.ignored,
                          "metrics": {k: vars(v) for k, v in summaries.items()},
                          "paired": {o: {k: vars(v) for k, v in r.items()} for o, r in pair.items()}},
                         "aggregate.json")
        written.append((g, run.run_id))
        if g.ignored:
            echo(f"aggregate: {g.label}: {len(g.ignored)} duplicate run(s) of a seed ignored ({DUPLICATE_RULE}): "
                 f"{', '.join(g.ignored)}")
        if inv_tags.get("aggregate.invalid_suites", "none") != "none":
            echo(f"aggregate: {g.label}: invalid suites (suite:seeds) {tags['aggregate.invalid_suites']}: "
                 "those seeds are left out of those suites' means")
        echo(f"aggregate: {'updated' if old is not None else 'created'} {run.run_id} {g.label} "
             f"({len(ids)} seeds, {len(summaries)} metrics)")
    return written
