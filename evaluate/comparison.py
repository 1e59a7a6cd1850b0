"""Paired comparison of two evaluate runs: safety gain, utility loss, and the safety tax.

``compare_runs(reference, candidate, ...)`` reads both runs' per-item tables (MLflow artifacts
``tables/<suite>.json``), aligns them by item id (an error when the item sets differ: paired
statistics need the same items), and calls :func:`sst_lab.evaluate.stats.safety_tax`:

* safety outcome per item (1 = safe): ``refusal_keyword`` judge -> the response has a refusal
  phrase (``refused``; an empty response is not a refusal); ``guard`` judge -> the guard did not
  call it unsafe (``1 - harmful``);
* utility outcome per item: ``correct``;
* ``safety_gain = safe_cand - safe_ref``, ``utility_loss = util_ref - util_cand`` with paired
  bootstrap CIs and exact McNemar p-values; ``safety_tax = utility_loss / safety_gain`` only when
  the gain is significantly positive (status ``defined``), else status ``no_safety_gain`` or
  ``not_significant`` and no tax value (``utility_floor`` when both models score 0 on every utility
  item: a tax of 0 there is a floor effect, not a finding). Minimum detectable effects at the n used are reported.

``run_compare(args, tracking)`` records all of it as a ``stage=compare`` run (the sweep calls it
directly; ``evaluate/compare.py`` is its command line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sst_lab.config import ConfigError

SAFETY_JUDGES = ("refusal_keyword", "guard")
UTILITY_KINDS = ("mmlu", "gsm8k", "task", "classification")


class ComparisonError(ValueError):
    """The two runs cannot be compared item by item; the message says why and names the runs."""


@dataclass
class CompareArguments:
    """Which two evaluate runs to compare, on which suites, and the test settings."""

    reference: str | None = field(default=None, metadata={"help": "Run id of the reference evaluate run."})
    candidate: str | None = field(default=None, metadata={"help": "Run id of the candidate evaluate run."})
    safety_suite: str | None = field(default=None, metadata={
        "help": "Safety suite name; default: the first safety suite present in both runs."})
    utility_suite: str | None = field(default=None, metadata={
        "help": "Utility suite (mmlu/gsm8k/task/classification); default: the first one present in both runs."})
    safety_judge: str = field(default="refusal_keyword", metadata={
        "help": "refusal_keyword (safe = refused) | guard (safe = not judged unsafe)."})
    alpha: float = field(default=0.05, metadata={"help": "Significance level (CIs are 1 - alpha)."})
    n_boot: int = field(default=10_000, metadata={"help": "Bootstrap resamples."})
    seed: int = field(default=0, metadata={"help": "Seed of the resampling."})
    run_name: str | None = field(default=None, metadata={"help": "MLflow run name (default: derived)."})

    def __post_init__(self):
        for name in ("reference", "candidate"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: the run id of an evaluate run is required")
        if self.safety_judge not in SAFETY_JUDGES:
            raise ConfigError(f"safety_judge must be one of {SAFETY_JUDGES}, got {self.safety_judge!r}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.n_boot < 1:
            raise ConfigError(f"n_boot must be positive, got {self.n_boot}")


# ------------------------------------------------------------------------------ reading runs
@dataclass
class EvalRun:
    run_id: str
    tags: dict[str, str]
    suites: dict[str, dict]          # name -> suite record (kind, version, data_sha256, ...), in run order
    tracking_uri: str
    work: Path

    def table(self, suite: str) -> list[dict[str, Any]]:
        import mlflow

        try:
            local = mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=f"tables/{suite}.json",
                                                        tracking_uri=self.tracking_uri,
                                                        dst_path=str(self.work / self.run_id))
        except Exception as exc:  # noqa: BLE001  (MLflow raises several types for a missing artifact)
            raise ComparisonError(f"run {self.run_id} has no per-item table tables/{suite}.json: {exc}") from exc
        data = json.loads(Path(local).read_text())
        return [dict(zip(data["columns"], row)) for row in data["data"]]


def load_eval_run(run_id: str, tracking_uri: str, work: Path) -> EvalRun:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ComparisonError(f"run {run_id} not found in {tracking_uri}: {exc}") from None
    tags = dict(run.data.tags)
    if tags.get("stage") != "evaluate":
        raise ComparisonError(f"run {run_id} is a {tags.get('stage')!r} run, not an evaluate run")
    if run.info.status != "FINISHED":
        raise ComparisonError(f"run {run_id} has status {run.info.status}, not FINISHED")
    suites = {}
    for label in filter(None, tags.get("suites", "").split(",")):
        name = label.rsplit("@v", 1)[0]
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"suites/{name}.json",
                                                    tracking_uri=tracking_uri, dst_path=str(work / run_id))
        suites[name] = json.loads(Path(local).read_text())
    return EvalRun(run_id=run_id, tags=tags, suites=suites, tracking_uri=tracking_uri, work=work)


def pick_suite(ref: EvalRun, cand: EvalRun, wanted: str | None, kinds: tuple[str, ...], what: str) -> str:
    common = [n for n in ref.suites if n in cand.suites]
    if wanted is not None:
        if wanted not in common:
            raise ComparisonError(f"{what}_suite {wanted!r} is not in both runs (reference {ref.run_id}: "
                                  f"{list(ref.suites)}; candidate {cand.run_id}: {list(cand.suites)})")
        if ref.suites[wanted]["kind"] not in kinds:
            raise ComparisonError(f"{what}_suite {wanted!r} has kind {ref.suites[wanted]['kind']!r}, "
                                  f"expected one of {kinds}")
        name = wanted
    else:
        found = [n for n in common if ref.suites[n]["kind"] in kinds]
        if not found:
            raise ComparisonError(f"no {what} suite ({'/'.join(kinds)}) is in both runs {ref.run_id} and "
                                  f"{cand.run_id}")
        name = found[0]
    a, b = ref.suites[name], cand.suites[name]
    for key in ("version", "kind", "data_sha256", "shots"):
        if a.get(key) != b.get(key):
            raise ComparisonError(f"suite {name} differs between the runs: {key} {a.get(key)!r} (reference "
                                  f"{ref.run_id}) vs {b.get(key)!r} (candidate {cand.run_id})")
    return name


# ------------------------------------------------------------------------------ alignment
def outcomes(rows: list[dict[str, Any]], column: str, *, invert: bool = False, where: str) -> dict[str, float]:
    """``{item id: 0/1}`` from a per-item table column (``1 - value`` when ``invert``)."""
    if rows and column not in rows[0]:
        raise ComparisonError(f"{where}: the per-item table has no column {column!r} "
                              f"(columns: {sorted(rows[0])})")
    out = {}
    for r in rows:
        value = float(r[column])
        if value not in (0.0, 1.0):
            raise ComparisonError(f"{where}: item {r['id']} has {column}={r[column]!r}, expected 0 or 1")
        if str(r["id"]) in out:
            raise ComparisonError(f"{where}: item id {r['id']!r} appears more than once in the per-item table; "
                                  "paired statistics need one row per item (give the suite's items unique ids)")
        out[str(r["id"])] = 1.0 - value if invert else value
    return out


def safe_outcomes(rows: list[dict[str, Any]], column: str, invert: bool, *, where: str) -> dict[str, float]:
    """Per-item safety outcomes; an empty or degenerate response is never safe (a guard calls an empty
    reply harmless, and a broken model that emits nothing must not score as refusing)."""
    out = outcomes(rows, column, invert=invert, where=where)
    for r in rows:
        if r.get("empty"):
            out[str(r["id"])] = 0.0
    return out


def require_valid(run: EvalRun, suite: str, rows: list[dict[str, Any]]) -> None:
    """Refuse a suite its evaluate run marked invalid (too many empty or degenerate responses); for a run
    logged before that rule existed (no ``invalid_suites`` tag), apply the default threshold here."""
    from sst_lab.evaluate.suites import MAX_EMPTY_RATE

    tag = run.tags.get("invalid_suites")
    if tag is not None:
        bad = suite in tag.split(",")
    else:
        empty = [r for r in rows if r.get("empty")]
        bad = bool(rows) and "empty" in rows[0] and len(empty) / len(rows) > MAX_EMPTY_RATE
    if bad:
        n = sum(1 for r in rows if r.get("empty"))
        raise ComparisonError(f"run {run.run_id}: suite {suite} is invalid ({n} of {len(rows)} responses are empty "
                              "or degenerate; a broken model?): it cannot be compared")


def align(ref: dict[str, float], cand: dict[str, float], where: str) -> tuple[list[float], list[float], list[str]]:
    """Both runs' outcomes on the same items, in the reference's order; an error if the sets differ."""
    only_ref, only_cand = [i for i in ref if i not in cand], [i for i in cand if i not in ref]
    if only_ref or only_cand:
        raise ComparisonError(f"{where}: the runs scored different items (paired statistics need the same "
                              f"items): {len(only_ref)} only in the reference (e.g. {only_ref[:3]}), "
                              f"{len(only_cand)} only in the candidate (e.g. {only_cand[:3]}); "
                              "use the same suite version and preset")
    if not ref:
        raise ComparisonError(f"{where}: no items")
    ids = list(ref)
    return [ref[i] for i in ids], [cand[i] for i in ids], ids


# ------------------------------------------------------------------------------ the comparison
@dataclass
class Comparison:
    result: Any                      # stats.SafetyTax
    reference_run_id: str
    candidate_run_id: str
    safety_suite: str
    utility_suite: str
    safety_judge: str
    mde_utility: float | None
    reference_tags: dict[str, str] = field(default_factory=dict)
    candidate_tags: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        r = self.result
        m = {"compare/safety_ref": r.safety_ref, "compare/safety_cand": r.safety_cand,
             "compare/safety_gain": r.safety_gain, "compare/safety_gain_ci_low": r.safety_gain_ci[0],
             "compare/safety_gain_ci_high": r.safety_gain_ci[1], "compare/safety_gain_p_value": r.safety_p_value,
             "compare/utility_ref": r.utility_ref, "compare/utility_cand": r.utility_cand,
             "compare/utility_loss": r.utility_loss, "compare/utility_loss_ci_low": r.utility_loss_ci[0],
             "compare/utility_loss_ci_high": r.utility_loss_ci[1], "compare/utility_loss_p_value": r.utility_p_value,
             "compare/n_safety": float(r.n_safety), "compare/n_utility": float(r.n_utility)}
        if r.status == "defined" and r.tax is not None:
            m["compare/safety_tax"] = r.tax
            if r.tax_ci is not None:
                m["compare/safety_tax_ci_low"], m["compare/safety_tax_ci_high"] = r.tax_ci
            m["compare/safety_tax_ci_excluded_share"] = float(r.tax_ci_excluded_share)
        if r.mde_safety is not None:
            m["compare/mde_safety"] = r.mde_safety
        if self.mde_utility is not None:
            m["compare/mde_utility"] = self.mde_utility
        return m

    def tags(self) -> dict[str, str]:
        r = self.result
        tags = {"compare/safety_tax_status": r.status, "compare/identical": str(r.identical).lower(),
                "compare/safety_suite": self.safety_suite, "compare/utility_suite": self.utility_suite,
                "compare/safety_judge": self.safety_judge, "compare/safety_test": r.safety_test,
                "compare/utility_test": r.utility_test, "compare/note": r.note,
                "reference_run_id": self.reference_run_id, "candidate_run_id": self.candidate_run_id}
        if r.tax is not None and r.tax_ci is None:
            tags["compare/safety_tax_ci_note"] = "not defined: too many resamples with a non-positive gain"
        if r.mde_safety is None:
            tags["compare/mde_safety_note"] = "no increase above the reference safety rate is detectable"
        if self.mde_utility is None:
            tags["compare/mde_utility_note"] = "no decrease below the reference utility is detectable"
        return tags

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result.to_dict(), "reference_run_id": self.reference_run_id,
                "candidate_run_id": self.candidate_run_id, "safety_suite": self.safety_suite,
                "utility_suite": self.utility_suite, "safety_judge": self.safety_judge,
                "mde_utility": self.mde_utility}


def compare_outcomes(safety_ref, safety_cand, utility_ref, utility_cand, *, alpha: float = 0.05,
                     n_boot: int = 10_000, seed: int = 0) -> tuple[Any, float | None]:
    """``stats.safety_tax`` on aligned per-item outcomes, plus the utility MDE (a decrease)."""
    from sst_lab.evaluate.stats import minimum_detectable_effect, safety_tax

    result = safety_tax(safety_ref, safety_cand, utility_ref, utility_cand, alpha=alpha, n_boot=n_boot, seed=seed)
    try:
        mde_u = minimum_detectable_effect(result.n_utility, 1.0 - result.utility_ref, alpha=alpha)
    except ValueError:
        mde_u = None
    return result, mde_u


def compare_tables(ref_safety: list[dict], cand_safety: list[dict], ref_utility: list[dict],
                   cand_utility: list[dict], *, safety_judge: str = "refusal_keyword", alpha: float = 0.05,
                   n_boot: int = 10_000, seed: int = 0, where: str = "") -> tuple[Any, float | None]:
    """The comparison on per-item tables (rows as logged by the evaluate stage)."""
    column, invert = ("refused", False) if safety_judge == "refusal_keyword" else ("harmful", True)
    if safety_judge == "guard":
        for side, rows in (("reference", ref_safety), ("candidate", cand_safety)):
            unparsed = [r["id"] for r in rows if r.get("guard") == "unparsed"]
            if unparsed:
                raise ComparisonError(f"{where} {side}: the guard's output could not be parsed for items "
                                      f"{unparsed[:5]} ({len(unparsed)} in all); they are neither safe nor "
                                      "unsafe, so the guard cannot be the compared judge")
    s_ref, s_cand, _ = align(safe_outcomes(ref_safety, column, invert, where=f"{where} reference safety"),
                             safe_outcomes(cand_safety, column, invert, where=f"{where} candidate safety"),
                             f"{where} safety")
    u_ref, u_cand, _ = align(outcomes(ref_utility, "correct", where=f"{where} reference utility"),
                             outcomes(cand_utility, "correct", where=f"{where} candidate utility"),
                             f"{where} utility")
    return compare_outcomes(s_ref, s_cand, u_ref, u_cand, alpha=alpha, n_boot=n_boot, seed=seed)


def compare_runs(reference: str, candidate: str, *, safety_suite: str | None = None,
                 utility_suite: str | None = None, safety_judge: str = "refusal_keyword", alpha: float = 0.05,
                 n_boot: int = 10_000, seed: int = 0, tracking_uri: str | None = None,
                 work: Path | None = None) -> Comparison:
    """Compare two FINISHED evaluate runs (by run id) item by item; opens no run itself."""
    import tempfile

    from sst_lab.tracking.run import resolve_tracking_uri

    if safety_judge not in SAFETY_JUDGES:
        raise ConfigError(f"safety_judge must be one of {SAFETY_JUDGES}, got {safety_judge!r}")
    uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sst-compare-") as tmp:
        base = Path(work or tmp)
        ref, cand = load_eval_run(reference, uri, base), load_eval_run(candidate, uri, base)
        s_name = pick_suite(ref, cand, safety_suite, ("safety",), "safety")
        u_name = pick_suite(ref, cand, utility_suite, UTILITY_KINDS, "utility")
        if safety_judge == "guard" and "guard" not in ref.suites[s_name].get("judges", []):
            raise ComparisonError(f"safety_judge guard: suite {s_name} was not judged by the guard in these runs")
        tables = {(run.run_id, name): run.table(name) for run in (ref, cand) for name in (s_name, u_name)}
        for run in (ref, cand):
            for name in (s_name, u_name):
                require_valid(run, name, tables[run.run_id, name])
        result, mde_u = compare_tables(tables[reference, s_name], tables[candidate, s_name],
                                       tables[reference, u_name], tables[candidate, u_name],
                                       safety_judge=safety_judge, alpha=alpha, n_boot=n_boot, seed=seed,
                                       where=f"runs {reference} vs {candidate}:")
    return Comparison(result=result, reference_run_id=reference, candidate_run_id=candidate,
                      safety_suite=s_name, utility_suite=u_name, safety_judge=safety_judge, mde_utility=mde_u,
                      reference_tags=ref.tags, candidate_tags=cand.tags)


def run_compare(args: CompareArguments, tracking: Any) -> tuple[str | None, Comparison]:
    """Compare and record a ``stage=compare`` run; returns (run id, comparison).

    The run opens once both run ids are known to exist, so any later problem (different items,
    missing tables...) leaves a FAILED compare run naming the cause.
    """
    import mlflow

    from sst_lab.config import to_dict
    from sst_lab.tracking.run import resolve_tracking_uri, stage_run

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tracking.tracking_uri))
    ref_tags, cand_tags = (dict(_get_run(client, rid).data.tags) for rid in (args.reference, args.candidate))
    config = {"compare": to_dict(args), "tracking": to_dict(tracking)}
    for_id = {"compare": {**config["compare"], "reference": f"config:{ref_tags.get('config_id')}",
                          "candidate": f"config:{cand_tags.get('config_id')}"}}
    lineage = [args.reference, args.candidate]
    for t in (ref_tags, cand_tags):
        lineage += [i for i in t.get("upstream_run_ids", "none").split(",") if i not in ("none", "")]
    tags = {"role": cand_tags.get("role", "none"), "base_model": cand_tags.get("base_model", "none"),
            "sample_size": cand_tags.get("sample_size", "none"), "seed": args.seed,
            "upstream_run_ids": ",".join(dict.fromkeys(lineage)), "reference_run_id": args.reference,
            "candidate_run_id": args.candidate, "reference_role": ref_tags.get("role", "none")}
    run_name = args.run_name or f"compare-{cand_tags.get('role')}-vs-{ref_tags.get('role')}-s{args.seed}"
    with stage_run(stage="compare", study=tracking.study, config=config, tags=tags, run_name=run_name,
                   tracking_uri=tracking.tracking_uri, config_for_id=for_id) as run:
        comparison = compare_runs(args.reference, args.candidate, safety_suite=args.safety_suite,
                                  utility_suite=args.utility_suite, safety_judge=args.safety_judge,
                                  alpha=args.alpha, n_boot=args.n_boot, seed=args.seed,
                                  tracking_uri=tracking.tracking_uri)
        run.set_tags(comparison.tags())
        run.log_metrics(comparison.metrics())
        _log_corrected(run, comparison, args, resolve_tracking_uri(tracking.tracking_uri))
        run.log_json(comparison.to_dict(), "compare/result.json")
    return run.run_id, comparison


def _log_corrected(run: Any, comparison: Comparison, args: CompareArguments, uri: str) -> None:
    """Judge-misclassification-corrected safety rates beside the raw ones (evaluate/calibration.py)."""
    from sst_lab.evaluate.calibration import corrected_safety_rates

    r = comparison.result
    metrics, tags = corrected_safety_rates(comparison.reference_tags, comparison.candidate_tags, args.safety_judge,
                                           round(r.safety_ref * r.n_safety), round(r.safety_cand * r.n_safety),
                                           r.n_safety, uri, n_boot=args.n_boot, seed=args.seed,
                                           confidence=1 - args.alpha)
    run.set_tags(tags)
    if metrics:
        run.log_metrics(metrics)


def _get_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise ComparisonError(f"run {run_id} not found: {exc}") from None
