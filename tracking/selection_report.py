"""Aggregates and report section of a study with a selection (see sst_lab.tracking.selection).

``write_selected_aggregates`` finds, per base model x sample size x family, the test-split
evaluations of the merges its ``select`` runs chose (one per seed), and writes one
``stage=aggregate`` run per family (``aggregate.group_stage = selected``): every metric's mean,
std, n and 95 % Student-t interval over seeds, and ``paired/<other family>/<metric>/...``: the mean
per-seed difference, its interval and a paired t-test p-value over the seeds both families share.
``selection_section`` reads those runs back (never recomputes) plus the select runs' validation
frontiers, so the HTML report and MLflow show the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sst_lab.tracking.aggregation import (CONFIDENCE, aggregate_metrics, aggregated_metric_names, clipped_tag,
                                          fetch_runs, holm, invalid_record, invalid_suites, log_metrics_chunked,
                                          metric_range, paired_summary, run_order, study_runs, suite_of,
                                          summarize, valid_metrics)

GROUP_STAGE = "selected"


def _chosen_tests(runs: list[Any]) -> tuple[dict[tuple[str, str, str], dict[str, Any]], dict[str, str]]:
    """(model, sample_size, family) -> {seed: test evaluate run of the chosen merge}, and each chosen
    merge run id -> the candidate label its select run chose. Of duplicate runs the first counts
    (``aggregation.run_order``), as for the sweep's reuse and every other aggregate."""
    tests = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("stage") == "evaluate"
             and r.data.tags.get("split") == "test"]
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for sel in sorted(runs, key=lambda r: run_order(r.info.start_time, r.info.run_id)):
        t = sel.data.tags
        if t.get("stage") != "select" or sel.info.status != "FINISHED":
            continue
        missing = [k for k in ("select.chosen_merge_run_id", "select.chosen_candidate") if k not in t]
        if missing:
            raise ValueError(f"select run {sel.info.run_id} (family {t.get('select.family')}, seed {t.get('seed')}) "
                             f"has no tag {', '.join(missing)}: sst_lab.tracking.selection writes both with the choice")
        merge_id = t["select.chosen_merge_run_id"]
        labels[merge_id] = t["select.chosen_candidate"]
        mine = [r for r in tests if r.data.tags.get("adapter_run_id") == merge_id]
        if not mine:
            continue  # the test evaluation of this choice has not run yet
        run = min(mine, key=lambda r: run_order(r.info.start_time, r.info.run_id))
        key = (t.get("sweep.model", "none"), t.get("sweep.sample_size", "none"), t.get("select.family", "none"))
        out.setdefault(key, {}).setdefault(t.get("seed"), run)
    return out, labels


def _chosen_compares(runs: list[Any], tests: dict[tuple[str, str, str], dict[str, Any]],
                     ) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """(model, sample_size, family, compare role) -> {seed: compare run whose candidate is the chosen
    setting's test evaluation}: the safety tax of the chosen settings, whichever setting each seed chose."""
    where = {run.info.run_id: (key, seed) for key, by_seed in tests.items() for seed, run in by_seed.items()}
    out: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in sorted(runs, key=lambda r: run_order(r.info.start_time, r.info.run_id)):
        t = r.data.tags
        hit = where.get(t.get("candidate_run_id", ""))
        if r.info.status != "FINISHED" or t.get("stage") != "compare" or hit is None:
            continue
        (model, size, family), seed = hit
        role = t.get("sweep.role") or f"{t.get('role', 'none')}_vs_{t.get('reference_role', 'none')}"
        out.setdefault((model, size, family, role), {}).setdefault(seed, r)
    return out


def write_selected_aggregates(study: str, tracking_uri: str | None = None, *, echo=print) -> list[str]:
    """One aggregate run per (model, sample size, family) of the chosen settings' test evaluations,
    and one per (model, sample size, family, compare pair) of their compare runs; reopened on rerun."""
    uri, runs = study_runs(study, tracking_uri)
    groups, chosen = _chosen_tests(runs)
    existing = {r.data.tags.get("aggregate.group_config_id"): r for r in runs
                if r.data.tags.get("aggregate.group_stage") == GROUP_STAGE}
    written = []
    bad = {key: {seed: invalid_suites(r.data.tags, r.data.metrics) for seed, r in by_seed.items()}
           for key, by_seed in groups.items()}
    values = {key: {seed: valid_metrics(r.data.metrics, bad[key][seed]) for seed, r in by_seed.items()}
              for key, by_seed in groups.items()}
    computed = {}
    for (model, size, family), by_seed in sorted(groups.items()):
        vals, invalid = values[(model, size, family)], bad[(model, size, family)]
        # every seed has the metric, except seeds where its suite was invalid (left out, counted, named)
        names = sorted({n for v in vals.values() for n in aggregated_metric_names(v)})
        names = [n for n in names if all(n in vals[s] or suite_of(n) in invalid[s] for s in vals)]
        summaries = {n: summarize([v[n] for v in vals.values() if n in v], bounds=metric_range(n)) for n in names}
        paired: dict[str, dict[str, Any]] = {}
        for (m2, s2, other), other_vals in values.items():
            if (m2, s2) != (model, size) or other == family:
                continue
            common = sorted(set(vals) & set(other_vals))
            if len(common) < 2:
                continue
            paired[other] = {}
            for n in names:
                both = [s for s in common if n in vals[s] and n in other_vals[s]]
                if len(both) >= 2 and all(suite_of(n) in invalid[s] + bad[(m2, s2, other)][s]
                                          for s in common if s not in both):
                    paired[other][n] = paired_summary([vals[s][n] - other_vals[s][n] for s in both])
        computed[(model, size, family)] = (summaries, paired)
    adjusted = holm_adjusted({k: v[1] for k, v in computed.items()})
    for (model, size, family), by_seed in sorted(groups.items()):
        summaries, paired = computed[(model, size, family)]
        invalid = bad[(model, size, family)]
        inv_tags, inv_metrics = invalid_record((s, invalid[s]) for s in sorted(by_seed))
        # as write_aggregates: a NaN fails the run, by name
        metrics = aggregate_metrics(summaries, paired, adjusted[(model, size, family)])
        metrics.update(inv_metrics)
        members = [by_seed[s] for s in sorted(by_seed)]
        tags = {"role": "merged", "aggregate.role": "merged", "aggregate.multiple_comparisons": HOLM_NOTE,
                "aggregate.chosen_candidates": ",".join(chosen[r.data.tags["adapter_run_id"]] for r in members),
                **inv_tags}
        written.append(_write(study, uri, f"{GROUP_STAGE}/{model}/n{size}/{family}", (model, size, family), members,
                              summaries, paired, metrics, tags, existing, echo))
        if inv_tags["aggregate.invalid_suites"] != "none":
            echo(f"aggregate: {GROUP_STAGE}/{model}/n{size}/{family}: invalid suites (suite:seeds) "
                 f"{inv_tags['aggregate.invalid_suites']}: those seeds are left out of those suites' means")
    for (model, size, family, role), by_seed in sorted(_chosen_compares(runs, groups).items()):
        members = [by_seed[s] for s in sorted(by_seed)]
        # as compare aggregates: a tax is defined in some seeds only; its n says how many
        summaries = {n: summarize([r.data.metrics[n] for r in members if n in r.data.metrics], bounds=metric_range(n))
                     for n in sorted({n for r in members for n in aggregated_metric_names(r.data.metrics)})}
        statuses = [r.data.tags.get("compare/safety_tax_status", "none") for r in members]
        tags = {"role": role, "aggregate.role": role, "aggregate.compare": "true",
                "aggregate.safety_tax_status": ",".join(f"{s}:{statuses.count(s)}" for s in sorted(set(statuses))),
                "aggregate.chosen_candidates": ",".join(  # the setting of the test evaluation each compared
                    chosen[groups[(model, size, family)][s].data.tags["adapter_run_id"]] for s in sorted(by_seed))}
        written.append(_write(study, uri, f"{GROUP_STAGE}/{model}/n{size}/{family}/{role}", (model, size, family),
                              members, summaries, {}, aggregate_metrics(summaries, {}), tags, existing, echo))
    return written


HOLM_NOTE = "p_holm: Holm over the family pairs of one model, sample size and metric"


def holm_adjusted(paired: dict[tuple[str, str, str], dict[str, dict[str, Any]]],
                  ) -> dict[tuple[str, str, str], dict[tuple[str, str], float]]:
    """Holm-adjusted paired p-values: per (model, sample size, metric), the family is every unordered
    pair of families with a p-value (a-b and b-a are one test: the same p); each direction gets the
    pair's adjusted value. ``paired``: (model, size, family) -> {other: {metric: Summary}}."""
    pairs: dict[tuple[str, str, str], dict[frozenset, float]] = {}
    for (model, size, family), res in paired.items():
        for other, by_metric in res.items():
            for n, summ in by_metric.items():
                if summ.p_value is not None:
                    pairs.setdefault((model, size, n), {})[frozenset((family, other))] = summ.p_value
    adj = {key: holm(ps) for key, ps in pairs.items()}
    out: dict[tuple[str, str, str], dict[tuple[str, str], float]] = {k: {} for k in paired}
    for (model, size, family), res in paired.items():
        for other, by_metric in res.items():
            for n in by_metric:
                p = adj.get((model, size, n), {}).get(frozenset((family, other)))
                if p is not None:
                    out[(model, size, family)][(other, n)] = p
    return out


def _write(study: str, uri: str, gid: str, where: tuple[str, str, str], members: list[Any], summaries: dict,
           paired: dict, metrics: dict[str, float], extra_tags: dict[str, str], existing: dict, echo) -> str:
    """Write (or reopen) the ``selected`` aggregate run ``gid`` of ``members`` (one run per seed)."""
    from sst_lab.tracking.run import stage_run

    model, size, family = where
    ids = [r.info.run_id for r in members]
    tags = {"sample_size": size, "seed": "all", "upstream_run_ids": ",".join(ids),
            "aggregate.group_stage": GROUP_STAGE, "aggregate.group_config_id": gid,
            "aggregate.model": model, "aggregate.sample_size": size, "aggregate.method": family,
            "aggregate.split": "test", "aggregate.member_run_ids": ",".join(ids),
            "aggregate.n_members": len(ids), "aggregate.seeds": ",".join(r.data.tags.get("seed", "none") for r in members),
            "aggregate.ci_clipped": clipped_tag(summaries), **extra_tags}
    old = existing.get(gid)
    with stage_run(stage="aggregate", study=study, config={"aggregate": {"group": gid, "confidence": CONFIDENCE}},
                   tags=tags, run_name=f"aggregate-{gid.replace('/', '-')}", tracking_uri=uri,
                   resume_run_id=old.info.run_id if old is not None else None) as run:
        log_metrics_chunked(run, metrics)
        run.log_json({"group": gid, "members": ids, "metrics": {k: vars(v) for k, v in summaries.items()},
                      "paired": {o: {k: vars(v) for k, v in r.items()} for o, r in paired.items()}}, "aggregate.json")
    echo(f"aggregate: {'updated' if old is not None else 'created'} {run.run_id} {gid} ({len(ids)} seeds)")
    return run.run_id


def _frontiers(client: Any, runs: list[Any], work: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(model, sample_size, family) -> validation points: candidate -> mean (safety, utility) over seeds."""
    import mlflow

    acc: dict[tuple[str, str, str], dict[str, list[tuple[float, float]]]] = {}
    chosen: dict[tuple[str, str, str], list[str]] = {}
    for sel in runs:
        t = sel.data.tags
        if t.get("stage") != "select" or sel.info.status != "FINISHED":
            continue
        path = mlflow.artifacts.download_artifacts(run_id=sel.info.run_id, artifact_path="select/frontier.json",
                                                   tracking_uri=client.tracking_uri, dst_path=str(work / sel.info.run_id))
        rec = json.loads(Path(path).read_text())
        key = (t.get("sweep.model", "none"), t.get("sweep.sample_size", "none"), rec.get("family", "none"))
        for c in rec["candidates"]:
            acc.setdefault(key, {}).setdefault(c["label"], []).append((c["safety"], c["utility"]))
        chosen.setdefault(key, []).append(rec["chosen"]["label"])
    out = {}
    for key, cands in acc.items():
        from sst_lab.tracking.selection import pareto_front

        labels = sorted(cands)
        pts = [tuple(sum(v) / len(v) for v in zip(*cands[lab])) for lab in labels]
        front = pareto_front(pts)
        out[key] = {"points": {lab: {"safety": p[0], "utility": p[1], "n_seeds": len(cands[lab]), "on_frontier": f}
                               for lab, p, f in zip(labels, pts, front)}, "chosen": chosen[key]}
    return out


def selection_section(client: Any, experiment_id: str, work: Path, safety_metric: str,
                      utility_metric: str, overrefusal_metric: str | None = None) -> dict[str, Any] | None:
    """Table rows (from the selected aggregate runs) and validation frontiers; None without selections.
    ``overrefusal_metric`` adds its column (the selection rule may not see what a choice costs there)."""
    runs = fetch_runs(client, experiment_id)
    aggs = [r for r in runs if r.data.tags.get("aggregate.group_stage") == GROUP_STAGE and r.info.status == "FINISHED"
            and r.data.tags.get("aggregate.compare") != "true"]
    if not aggs:
        return None
    columns = [("safety", safety_metric), ("utility", utility_metric)]
    if overrefusal_metric and overrefusal_metric not in (safety_metric, utility_metric):
        columns.append(("overrefusal", overrefusal_metric))
    rows = []
    for r in sorted(aggs, key=lambda r: r.data.tags["aggregate.group_config_id"]):
        t, m = r.data.tags, r.data.metrics
        row = {"aggregate_run_id": r.info.run_id, "model": t["aggregate.model"], "sample_size": t["aggregate.sample_size"],
               "family": t["aggregate.method"], "seeds": t["aggregate.seeds"],
               "chosen": t.get("aggregate.chosen_candidates", ""),
               "invalid_suites": t.get("aggregate.invalid_suites", "none")}
        for col, name in columns:
            for stat in ("mean", "ci_low", "ci_high", "n"):
                if f"{name}/{stat}" in m:
                    row[f"{col}_{stat}"] = m[f"{name}/{stat}"]
        row["paired"] = {}
        for key, value in m.items():
            for col, name in columns:
                if key.startswith("paired/") and key.endswith(f"/{name}/p_value"):
                    other = key[len("paired/"):-len(f"/{name}/p_value")]
                    row["paired"].setdefault(other, {})[f"{col}_p_value"] = value
                    row["paired"][other][f"{col}_diff"] = m[f"paired/{other}/{name}/mean"]
                    if f"paired/{other}/{name}/p_holm" in m:
                        row["paired"][other][f"{col}_p_holm"] = m[f"paired/{other}/{name}/p_holm"]
        rows.append(row)
    fronts = _frontiers(client, runs, work)
    return {"safety_metric": safety_metric, "utility_metric": utility_metric,
            "overrefusal_metric": dict(columns).get("overrefusal"), "rows": rows,
            "frontiers": {"|".join(k): v for k, v in fronts.items()}}


def plot_selection(section: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in section["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    colors = {}
    for ax, model in zip(axes[0], models):
        for key, fr in section["frontiers"].items():
            m, _size, fam = key.split("|")
            if m != model:
                continue
            c = colors.setdefault(fam, f"C{len(colors)}")
            pts = sorted(fr["points"].values(), key=lambda p: p["safety"])
            ax.scatter([p["safety"] for p in pts], [p["utility"] for p in pts], color=c, alpha=0.35, marker="o")
            front = [p for p in pts if p["on_frontier"]]
            ax.plot([p["safety"] for p in front], [p["utility"] for p in front], color=c, alpha=0.5,
                    label=f"{fam} validation frontier")
        for r in section["rows"]:
            if r["model"] != model or "safety_mean" not in r or "utility_mean" not in r:
                continue
            c = colors.setdefault(r["family"], f"C{len(colors)}")
            xe = [[r["safety_mean"] - r.get("safety_ci_low", r["safety_mean"])],
                  [r.get("safety_ci_high", r["safety_mean"]) - r["safety_mean"]]]
            ye = [[r["utility_mean"] - r.get("utility_ci_low", r["utility_mean"])],
                  [r.get("utility_ci_high", r["utility_mean"]) - r["utility_mean"]]]
            ax.errorbar([r["safety_mean"]], [r["utility_mean"]], xerr=xe, yerr=ye, color=c, marker="*",
                        markersize=12, capsize=3, label=f"{r['family']} chosen, test (95% CI)")
        ax.set_title(model)
        ax.set_xlabel(section["safety_metric"])
        ax.set_ylabel(section["utility_metric"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def render_section(section: dict[str, Any]) -> str:
    import html

    e = html.escape

    def cell(r, col):
        if f"{col}_mean" not in r:
            return "—"
        lo, hi = r.get(f"{col}_ci_low"), r.get(f"{col}_ci_high")
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
        return f"{r[f'{col}_mean']:.3f}{ci} (n={int(r.get(f'{col}_n', 0))})"

    cols = ["safety", "utility"] + (["overrefusal"] if section.get("overrefusal_metric") else [])

    def paired(r):
        parts = []
        for other, v in sorted(r["paired"].items()):
            for col in cols:
                if f"{col}_p_value" in v:
                    holm_p = f", Holm {v[f'{col}_p_holm']:.3g}" if f"{col}_p_holm" in v else ""
                    parts.append(f"vs {other}: Δ{col} {v[f'{col}_diff']:+.3f} (p={v[f'{col}_p_value']:.3g}{holm_p})")
        return "; ".join(parts) or "—"

    body = "".join(
        f"<tr><td>{e(r['model'])}</td><td>{e(r['sample_size'])}</td><td>{e(r['family'])}</td>"
        f"<td>{e(r['chosen'])}</td>" + "".join(f"<td>{cell(r, c)}</td>" for c in cols) +
        f"<td>{e(paired(r))}</td></tr>" for r in section["rows"])
    notes = "".join(f"<li>{e(r['model'])} {e(r['family'])}: invalid suites (suite:seeds) {e(r['invalid_suites'])}, "
                    f"left out of those suites' means (aggregate run {e(r['aggregate_run_id'])})</li>"
                    for r in section["rows"] if r.get("invalid_suites", "none") != "none")
    notes = f"<p>Notes:</p><ul>{notes}</ul>" if notes else ""
    return ("<h2>Chosen on validation, scored on test</h2><p>Each family's setting was chosen per seed on the "
            "validation split (select runs); cells are test-split means with the 95% Student-t interval over seeds; "
            "paired t-tests between families at their chosen settings over common seeds (p uncorrected; Holm: "
            "adjusted over all family pairs of the metric).</p>"
            "<table><tr><th>model</th><th>n</th><th>method</th><th>chosen (per seed)</th>"
            + "".join(f"<th>{e(section[f'{c}_metric'])}</th>" for c in cols) + "<th>paired</th></tr>"
            f"{body}</table>{notes}")
