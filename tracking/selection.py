"""Choosing merge hyper-parameters on the validation split, fairly: the ``select`` stage's library.

A study with a ``selection:`` section tunes every merge *family* (linear, TIES, DARE-TIES, SST...)
over its own candidate settings (entries of ``merge.methods``) with the same budget (number of
candidates). Per base model x sample size x seed and family, the sweep

1. evaluates every candidate merge and the utility adapter on the ``validation`` split,
2. runs ``tracking/select.py`` (stage ``select``): it reads only those validation runs, refuses any
   run whose ``split`` tag is not ``validation``, applies the declared rule and records the choice,
   the candidates' values and the validation Pareto frontier (``select/frontier.json``),
3. evaluates only the chosen merge on the ``test`` split (``--adapter`` = the chosen merge run).

Rules (``rule``; utility loss = reference utility - candidate utility, reference = the utility
adapter on the same validation items):

``max_safety_within_delta``     the highest safety among candidates with loss <= ``delta``;
``max_safety_within_delta_ci``  the same, admissible only if the loss's upper bound (reference
                                utility - the candidate's lower 95 % bound ``<utility>_ci_low``)
                                is <= ``delta`` (a conservative variant for small validation sets).

``constraints`` (optional, both rules): further validation metrics a choice may not lose more than
``delta`` of against the same reference, e.g. ``{metric: overrefusal/xstest-keyword/compliance_rate_safe,
delta: 0.1}`` keeps a merge whose safety gain is bought with over-refusal of safe prompts from being
chosen. A candidate is admissible only if it meets the utility bound and every constraint (point
estimates); ``select/frontier.json`` gives each candidate's value and loss per constraint. The
validation evaluations must score the constraint's suite (``validation_args``), or the select run
fails naming the run and the metric.

Ties: higher utility, then the candidate label. When no candidate is admissible, ``fallback``
(declared in the study's ``selection:``, tag ``select.fallback``) decides:

``min_loss`` (default)  the candidate with the smallest utility loss is chosen (constraints are not
                        considered then), and the run says so
                        (``select.admissible = false``);
``refuse``              the select run FAILS, naming the family, the seed and every candidate's loss
                        (so nothing downstream is tested on a setting that broke the rule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RULES = ("max_safety_within_delta", "max_safety_within_delta_ci")
FALLBACKS = ("min_loss", "refuse")
SELECT_SPLIT = "validation"


class SelectionError(ValueError):
    """The selection cannot be made honestly (wrong split, missing metric, unequal budgets...)."""


@dataclass
class SelectionSpec:
    """The study's ``selection:`` section."""

    families: dict[str, list[str]]  # tuned method -> labels of its candidate settings in merge.methods
    budget: int  # candidates per family (the same for every family unless allow_unequal_budgets)
    safety_metric: str  # validation metric to maximise, e.g. safety/advbench/refusal_rate
    utility_metric: str  # validation metric whose loss vs the utility adapter is bounded
    rule: str = RULES[0]
    delta: float = 0.02  # largest utility loss (in the metric's units) a chosen setting may cost
    allow_unequal_budgets: bool = False  # explicit opt-out of the equal-budget check
    fallback: str = FALLBACKS[0]  # no admissible candidate: min_loss (choose, flagged) or refuse (fail)
    constraints: list[dict[str, Any]] = field(default_factory=list)  # [{metric, delta}]: more bounded losses
    validation_args: dict[str, Any] = field(default_factory=dict)  # evaluate overrides on validation
    test_args: dict[str, Any] = field(default_factory=dict)  # evaluate overrides on test

    def check(self, method_labels: list[str], source: str) -> None:
        where = f"{source}: selection"
        if self.rule not in RULES:
            raise SelectionError(f"{where}.rule must be one of {RULES}, got {self.rule!r}")
        if self.fallback not in FALLBACKS:
            raise SelectionError(f"{where}.fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if not _non_negative(self.delta):
            raise SelectionError(f"{where}.delta must be a non-negative number, got {self.delta!r}")
        for i, con in enumerate(self.constraints):
            bad = not isinstance(con, Mapping) or set(con) != {"metric", "delta"} or \
                not isinstance(con["metric"], str) or "=" in con["metric"] or not _non_negative(con["delta"])
            if bad:
                raise SelectionError(f"{where}.constraints[{i}] must be {{metric: <validation metric>, delta: "
                                     f"<largest loss vs the utility adapter, >= 0>}}, got {con!r}")
            if con["metric"] in (self.safety_metric, self.utility_metric):
                raise SelectionError(f"{where}.constraints[{i}]: {con['metric']} is already the safety or "
                                     "utility metric")
        if not self.families:
            raise SelectionError(f"{where}.families: give at least one family of candidate methods")
        seen: dict[str, str] = {}
        for fam, labels in self.families.items():
            for lab in labels:
                if lab not in method_labels:
                    raise SelectionError(f"{where}.families.{fam}: {lab!r} is not in merge.methods {method_labels}")
                if lab in seen:
                    raise SelectionError(f"{where}.families: {lab!r} is in both {seen[lab]} and {fam}")
                seen[lab] = fam
        sizes = {fam: len(labels) for fam, labels in self.families.items()}
        if not self.allow_unequal_budgets and any(n != self.budget for n in sizes.values()):
            raise SelectionError(f"{where}: every family must have budget={self.budget} candidates, got {sizes}; "
                                 "unequal tuning budgets make the comparison unfair (set "
                                 "selection.allow_unequal_budgets: true to run it anyway)")
        if any(n < 1 or n > self.budget for n in sizes.values()):
            raise SelectionError(f"{where}: each family needs 1..budget={self.budget} candidates, got {sizes}")
        for key in ("split",):
            if key in self.validation_args or key in self.test_args:
                raise SelectionError(f"{where}: validation_args/test_args set {key}; the sweep sets it")

    def constraint_args(self) -> list[str]:
        """The select stage's ``--constraints`` values: ``METRIC=DELTA``."""
        return [f"{c['metric']}={c['delta']}" for c in self.constraints]


def _non_negative(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1e9


def parse_constraints(values: list[str] | None) -> list[tuple[str, float]]:
    """``METRIC=DELTA`` strings (the select stage's ``--constraints``) as (metric, delta) pairs."""
    out = []
    for v in values or []:
        metric, sep, delta = v.rpartition("=")
        try:
            d = float(delta)
        except ValueError:
            d = math.nan
        if not sep or not metric or not _non_negative(d):
            raise SelectionError(f"--constraints: {v!r} is not METRIC=DELTA with DELTA >= 0")
        out.append((metric, d))
    return out


@dataclass
class Candidate:
    label: str  # the candidate's merge.methods label (sweep.method of its evaluate run)
    eval_run_id: str
    merge_run_id: str
    safety: float
    utility: float
    utility_ci_low: float | None
    loss: float = math.nan
    admissible: bool = False
    on_frontier: bool = False
    constraint_values: dict[str, float] = field(default_factory=dict)  # constraint metric -> value
    constraint_losses: dict[str, float] = field(default_factory=dict)  # reference value - value


def check_validation_run(run: Any, what: str) -> None:
    """A run may feed a selection only if it is a FINISHED evaluate run of the validation split."""
    tags = run.data.tags
    rid = run.info.run_id
    if tags.get("stage") != "evaluate":
        raise SelectionError(f"{what}: run {rid} is a {tags.get('stage')!r} run, not an evaluate run")
    if tags.get("split") != SELECT_SPLIT:
        raise SelectionError(f"{what}: run {rid} has split={tags.get('split', 'missing')!r}; only "
                             f"{SELECT_SPLIT}-split runs may feed a selection (a test number must never "
                             "influence a choice)")
    if run.info.status != "FINISHED":
        raise SelectionError(f"{what}: run {rid} is {run.info.status}, not FINISHED")


def _metric(run: Any, name: str, what: str) -> float:
    value = run.data.metrics.get(name)
    if value is None or not math.isfinite(value):
        have = sorted(m for m in run.data.metrics if not m.startswith("system/"))[:12]
        raise SelectionError(f"{what}: run {run.info.run_id} has no finite metric {name!r}; it has {have} ...")
    return float(value)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (safety, utility) points no other point dominates (>= both, > one)."""
    return [not any(s2 >= s and u2 >= u and (s2 > s or u2 > u) for s2, u2 in points) for s, u in points]


def choose(cands: list[Candidate], reference_utility: float, rule: str, delta: float,
           constraints: list[tuple[str, float]] = (), reference_values: Mapping[str, float] | None = None,
           ) -> tuple[Candidate, bool]:
    """Apply ``rule`` and the ``constraints`` ((metric, delta) pairs; each candidate's
    ``constraint_values`` against ``reference_values``); returns the chosen candidate and whether it
    was admissible."""
    for c in cands:
        c.loss = reference_utility - c.utility
        bound = c.loss if rule == "max_safety_within_delta" else \
            (reference_utility - c.utility_ci_low if c.utility_ci_low is not None else math.inf)
        c.admissible = bound <= delta + 1e-12
        for metric, d in constraints:
            c.constraint_losses[metric] = reference_values[metric] - c.constraint_values[metric]
            c.admissible = c.admissible and c.constraint_losses[metric] <= d + 1e-12
    for c, front in zip(cands, pareto_front([(c.safety, c.utility) for c in cands])):
        c.on_frontier = front
    ok = [c for c in cands if c.admissible]
    if ok:
        return max(ok, key=lambda c: (c.safety, c.utility, c.label)), True
    return min(cands, key=lambda c: (c.loss, -c.safety, c.label)), False


def select_from_runs(client: Any, candidate_ids: list[str], reference_id: str, *, safety_metric: str,
                     utility_metric: str, rule: str, delta: float, budget: int | None, fallback: str = FALLBACKS[0],
                     constraints: list[tuple[str, float]] = (), what: str = "selection") -> dict[str, Any]:
    """Read and check the runs, choose, and return the record the select run logs (``what`` names the
    family and seed in errors)."""
    if rule not in RULES:
        raise SelectionError(f"rule must be one of {RULES}, got {rule!r}")
    if fallback not in FALLBACKS:
        raise SelectionError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if len(set(candidate_ids)) != len(candidate_ids) or not candidate_ids:
        raise SelectionError(f"candidates: give distinct evaluate run ids, got {candidate_ids}")
    if budget is not None and len(candidate_ids) != budget:
        raise SelectionError(f"candidates: {len(candidate_ids)} runs but the declared budget is {budget}")
    ref = client.get_run(reference_id)
    check_validation_run(ref, "reference")
    ref_utility = _metric(ref, utility_metric, "reference")
    ref_values = {m: _metric(ref, m, "reference (constraint)") for m, _ in constraints}
    cands, seeds, suites = [], {ref.data.tags.get("seed")}, {ref.data.tags.get("suites")}
    for rid in candidate_ids:
        run = client.get_run(rid)
        check_validation_run(run, "candidates")
        tags = run.data.tags
        if tags.get("role") != "merged" or tags.get("adapter_run_id", "none") == "none":
            raise SelectionError(f"candidates: run {rid} is not an evaluation of a merge run (role "
                                 f"{tags.get('role')!r}, adapter_run_id {tags.get('adapter_run_id')!r})")
        seeds.add(tags.get("seed"))
        suites.add(tags.get("suites"))
        low = run.data.metrics.get(f"{utility_metric}_ci_low")
        if rule == "max_safety_within_delta_ci" and low is None:
            raise SelectionError(f"candidates: run {rid} has no {utility_metric}_ci_low, which rule {rule} needs")
        cands.append(Candidate(tags.get("sweep.method") or tags.get("merge_method") or rid, rid,
                               tags["adapter_run_id"], _metric(run, safety_metric, "candidates"),
                               _metric(run, utility_metric, "candidates"), low,
                               constraint_values={m: _metric(run, m, "candidates (constraint)")
                                                  for m, _ in constraints}))
    if len(seeds) > 1 or len(suites) > 1:
        raise SelectionError(f"candidates and reference must share seed and suites; seeds {sorted(map(str, seeds))}, "
                             f"suites {sorted(map(str, suites))}")
    chosen, admissible = choose(cands, ref_utility, rule, delta, constraints, ref_values)
    if not admissible and fallback == "refuse":
        losses = ", ".join(f"{c.label}: loss {c.loss:.4f}" + "".join(f", {m} loss {v:.4f}" for m, v in
                                                                     c.constraint_losses.items()) for c in cands)
        raise SelectionError(f"{what}: no candidate meets rule {rule} with delta {delta}"
                             + "".join(f" and {m} loss <= {d}" for m, d in constraints) + " (reference utility "
                             f"{ref_utility:.4f}; {losses}) and the declared fallback is refuse; widen delta, add "
                             "candidates, or declare selection.fallback: min_loss")
    return {"rule": rule, "delta": delta, "budget": budget, "fallback": fallback, "safety_metric": safety_metric,
            "utility_metric": utility_metric, "split": SELECT_SPLIT,
            "reference": {"eval_run_id": reference_id, "utility": ref_utility, "constraint_values": ref_values},
            "constraints": [{"metric": m, "delta": d} for m, d in constraints],
            "chosen": vars(chosen), "admissible": admissible,
            "candidates": [vars(c) for c in cands]}


def record_tags_metrics(record: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, float]]:
    ch = record["chosen"]
    tags = {"select.chosen_candidate": ch["label"], "select.chosen_eval_run_id": ch["eval_run_id"],
            "select.chosen_merge_run_id": ch["merge_run_id"], "select.admissible": str(record["admissible"]).lower(),
            "select.rule": record["rule"], "select.delta": str(record["delta"]), "split": SELECT_SPLIT,
            "select.fallback": record["fallback"],
            "select.candidate_eval_run_ids": ",".join(c["eval_run_id"] for c in record["candidates"])}
    if record.get("constraints"):
        tags["select.constraints"] = "; ".join(f"{c['metric']} loss <= {c['delta']}" for c in record["constraints"])
    metrics = {"select/chosen/safety": ch["safety"], "select/chosen/utility": ch["utility"],
               "select/chosen/utility_loss": ch["loss"], "select/reference/utility": record["reference"]["utility"],
               "select/n_candidates": float(len(record["candidates"])),
               "select/n_admissible": float(sum(c["admissible"] for c in record["candidates"])),
               "select/n_frontier": float(sum(c["on_frontier"] for c in record["candidates"]))}
    for metric, loss in ch.get("constraint_losses", {}).items():
        metrics[f"select/chosen/constraint_loss/{metric}"] = loss
    return tags, metrics
