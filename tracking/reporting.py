"""The study report: a table and four plots built from the study's aggregate runs.

Everything shown comes from ``stage=aggregate`` runs (``tracking/aggregate.py``) except the SST
eigen-spectra, read from the merge runs' ``merge_report.json``. Outputs (``report.html`` with the
plots embedded, the same plots as PNG, ``report_table.json``) go to a new folder and into the
study's report run as artifacts.

Table: one per sample size; rows are base, utility, safety and the merge methods, column groups
are the models with safety, over-refusal (compliance on safe prompts), utility and safety tax,
each ``mean ± half-width of the 95 % t-interval over seeds (n seeds)``. Marks: ``*`` on a merged
method's safety / over-refusal / utility: the paired t-test across seeds against the reference
method has p < 0.05 (``▲``/``▼`` give the direction); ``*`` on a safety tax: its interval over
seeds excludes 0; ``k/n`` after a tax: seeds where the tax is defined (significant safety gain);
``k/n valid`` after a value: seeds whose suite was valid (an evaluate run marks a suite with too many
empty or degenerate responses invalid; aggregation leaves those seeds out of that suite's means and
names them in ``aggregate.invalid_suites``), with a line per such aggregate under the table.

The table shows one split (``table_split``): in a study with a selection, the test split, with
each method's row from its ``selected`` aggregate (the setting each seed chose); validation
numbers are in the selection section. A cell that more than one aggregate matches is left empty
and names them (e.g. a tax when seeds chose different settings), never one picked at random.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from mlflow.exceptions import MlflowException

from sst_lab.tracking.selection_report import GROUP_STAGE

ALPHA = 0.05
DEFAULT_PATTERNS = {
    "safety": r"^safety/[^/]+/refusal_rate$",
    "overrefusal": r"^overrefusal/[^/]+/compliance_rate_safe$",
    "utility": r"^utility/[^/]+/(accuracy|exact_match)$",
}
TAX = "compare/safety_tax"
COLUMNS = ("safety", "overrefusal", "utility", "tax")
TITLES = {"safety": "safety", "overrefusal": "over-refusal (safe compliance)", "utility": "utility",
          "tax": "safety tax"}
REFERENCE_ROWS = ("base", "utility", "safety")


@dataclass
class Agg:
    run_id: str
    stage: str
    role: str
    model: str
    sample_size: str
    method: str
    metrics: dict[str, float]
    tags: dict[str, str]
    split: str = "all"  # the evaluate runs' split (validation / test in a selection study)

    def invalid_seeds(self) -> dict[str, list[str]]:
        """suite -> seeds whose evaluation of it was invalid (tag ``aggregate.invalid_suites``)."""
        tag = self.tags.get("aggregate.invalid_suites", "none")
        if tag == "none":
            return {}
        return {suite: seeds.split(",") for suite, _, seeds in (part.partition(":") for part in tag.split(";"))}

    def summary(self, name: str) -> dict[str, float] | None:
        if f"{name}/mean" not in self.metrics:
            return None
        return {k: self.metrics[f"{name}/{k}"] for k in ("mean", "ci_low", "ci_high", "n")
                if f"{name}/{k}" in self.metrics}


@dataclass
class Cell:
    sample_size: str
    model: str
    row: str
    column: str
    metric: str
    mean: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    mark: str = ""
    note: str = ""
    aggregate_run_id: str | None = None

    def text(self) -> str:
        if self.mean is None:
            return "—"
        return f"{self.mean:.3f}{interval_text(self.mean, self.ci_low, self.ci_high)} ({self.n}){self.mark}" \
            f"{' ' + self.note if self.note else ''}"


def interval_text(mean: float, low: float | None, high: float | None) -> str:
    """`` ± half`` for a symmetric interval, `` [low, high]`` for one cut by the metric's range."""
    if low is None or high is None:
        return ""
    if abs((high - mean) - (mean - low)) < 5e-4:
        return f" ± {high - mean:.3f}"
    return f" [{low:.3f}, {high:.3f}]"


@dataclass
class ReportData:
    study: str
    aggs: list[Agg]
    metrics: dict[str, str]  # column -> metric name
    models: list[str]
    sample_sizes: list[str]
    methods: list[str]
    reference_method: str | None
    cells: list[Cell] = field(default_factory=list)
    split: str = "all"  # the split the table shows: test when the study has one (see ``table_split``)
    selected: bool = False  # merged rows are the chosen settings' aggregates (stage ``selected``)

    @property
    def split_label(self) -> str:
        """``", test split"`` for titles, empty for a study without splits."""
        return f", {self.split} split" if self.split != "all" else ""


def load_aggregates(client: Any, experiment_id: str) -> list[Agg]:
    from sst_lab.tracking.aggregation import fetch_runs

    out = []
    for r in fetch_runs(client, experiment_id):
        t = r.data.tags
        if t.get("stage") != "aggregate" or r.info.status != "FINISHED" or "aggregate.group_stage" not in t:
            continue
        out.append(Agg(r.info.run_id, t["aggregate.group_stage"], t.get("aggregate.role", "none"),
                       t.get("aggregate.model", "none"), t.get("aggregate.sample_size", "none"),
                       t.get("aggregate.method", "none"), dict(r.data.metrics), dict(t), t.get("aggregate.split", "all")))
    return out


def pick_metrics(aggs: list[Agg], chosen: Mapping[str, str | None]) -> dict[str, str]:
    """The metric of each column: as configured, else the first evaluate metric matching the default."""
    names = sorted({m[: -len("/mean")] for a in aggs if a.stage == "evaluate" for m in a.metrics
                    if m.endswith("/mean") and not m.startswith("paired/")})
    out = {}
    for col, pattern in DEFAULT_PATTERNS.items():
        name = chosen.get(col)
        if not name:
            found = [n for n in names if re.match(pattern, n)]
            # utility: the task metric (exact_match of the utility adapter's own task) before a
            # benchmark accuracy (the demo's MMLU sits at chance for every model: a flat axis)
            found.sort(key=lambda n: (not n.endswith("/exact_match"), n))
            if not found:
                raise ValueError(f"report: no evaluate metric matches {pattern!r} for the {col} column; "
                                 f"set report.{col}_metric in the study (known: {names[:12]} ...)")
            name = found[0]
        out[col] = name
    out["tax"] = TAX
    return out


def _size_key(s: str) -> tuple[int, float]:
    try:
        return (0, float(s))
    except ValueError:
        return (1, 0.0)


def table_split(aggs: list[Agg]) -> str:
    """The one split the table shows: ``test`` when any evaluate aggregate is of the test split (a
    study with a selection: validation numbers chose the settings and are in the selection
    section), else ``all`` (a study without splits), else the only split there is."""
    splits = {a.split for a in aggs if a.stage == "evaluate"}
    return next((s for s in ("test", "all") if s in splits), min(splits, default="all"))


def build(study: str, aggs: list[Agg], chosen: Mapping[str, str | None], reference_method: str | None) -> ReportData:
    if not aggs:
        raise ValueError(f"report: study {study!r} has no aggregate runs; run tracking/aggregate.py --study {study}")
    split = table_split(aggs)
    shown = [a for a in aggs if a.stage != "evaluate" or a.split == split]  # one split, never a mix
    metrics = pick_metrics(shown, chosen)
    models = sorted({a.model for a in shown if a.stage == "evaluate"})
    sizes = sorted({a.sample_size for a in shown if a.stage == "evaluate" and a.sample_size != "none"}, key=_size_key)
    selected = sorted({a.method for a in shown if a.stage == GROUP_STAGE and a.split == split})
    methods = selected or sorted({a.method for a in shown if a.stage == "evaluate" and a.role == "merged"})
    ref = reference_method if reference_method in methods else (methods[0] if methods else None)
    if ref:
        methods = [ref, *[m for m in methods if m != ref]]
    data = ReportData(study, shown, metrics, models, sizes or ["none"], methods, ref, split=split,
                      selected=bool(selected))
    for size in data.sample_sizes:
        for model in models:
            for row in [*REFERENCE_ROWS, *methods]:
                for col in COLUMNS:
                    data.cells.append(_cell(data, size, model, row, col))
    return data


def find(aggs: list[Agg], stage: str, role: str, model: str, size: str, method: str = "none") -> list[Agg]:
    """The aggregates of (stage, role, model, method) at this sample size, else the size-free ones:
    one, or several when the cell is ambiguous (e.g. the chosen setting differs between seeds, so
    their compare runs fall into one group per setting); the caller says so instead of picking."""
    for s in (size, "none"):
        hits = [a for a in aggs if (a.stage, a.role, a.model, a.sample_size, a.method) == (stage, role, model, s, method)]
        if hits:
            return hits
    return []


def _cell(data: ReportData, size: str, model: str, row: str, col: str) -> Cell:
    metric = data.metrics[col]
    cell = Cell(size, model, row, col, metric)
    merged = row not in REFERENCE_ROWS
    if col == "tax":
        role = "merged_vs_utility" if merged else ("safety_vs_base" if row == "safety" else None)
        stage = GROUP_STAGE if merged and data.selected else "compare"
        hits = find(data.aggs, stage, role, model, size, row if merged else "none") if role else []
    else:
        stage = GROUP_STAGE if merged and data.selected else "evaluate"
        hits = find(data.aggs, stage, "merged" if merged else row, model, size, row if merged else "none")
    if len(hits) > 1:
        cell.note = f"{len(hits)} aggregates match, none shown: " + ", ".join(a.run_id for a in hits)
        return cell
    agg = hits[0] if hits else None
    s = agg.summary(metric) if agg is not None else None
    if s is None:
        if agg is not None and col == "tax":
            cell.aggregate_run_id, cell.note = agg.run_id, f"0/{agg.tags.get('aggregate.n_members', '?')} defined"
        return cell
    cell.aggregate_run_id = agg.run_id
    cell.mean, cell.ci_low, cell.ci_high = s["mean"], s.get("ci_low"), s.get("ci_high")
    cell.n = int(s["n"])
    bad = agg.invalid_seeds().get(metric.split("/")[1] if metric.count("/") >= 2 else "", [])
    if bad:  # seeds whose suite was invalid are out of this mean: say how many are in
        members = int(agg.tags.get("aggregate.n_members", cell.n + len(bad)))
        cell.note = f"{members - len(bad)}/{members} valid"
    if col == "tax":
        if cell.ci_low is not None and (cell.ci_low > 0 or cell.ci_high < 0):
            cell.mark = "*"
        cell.note = f"{cell.n}/{agg.tags.get('aggregate.n_members', '?')} defined"
    elif merged and data.reference_method and row != data.reference_method:
        p = agg.metrics.get(f"paired/{data.reference_method}/{metric}/p_holm",  # selected: Holm-adjusted
                            agg.metrics.get(f"paired/{data.reference_method}/{metric}/p_value"))
        diff = agg.metrics.get(f"paired/{data.reference_method}/{metric}/mean")
        if p is not None and p < ALPHA and diff is not None:
            cell.mark = "*" + ("▲" if diff > 0 else "▼")
    return cell


# ----------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(cell: Cell) -> tuple[float, float]:
    if cell.mean is None or cell.ci_low is None:
        return (0.0, 0.0)
    return (cell.mean - cell.ci_low, cell.ci_high - cell.mean)


def _rows(data: ReportData) -> list[str]:
    return [*REFERENCE_ROWS, *data.methods]


def _get(data: ReportData, size: str, model: str, row: str, col: str) -> Cell:
    for c in data.cells:
        if (c.sample_size, c.model, c.row, c.column) == (size, model, row, col):
            return c
    raise KeyError((size, model, row, col))


def plot_pareto(data: ReportData):
    plt = _plt()
    fig, axes = plt.subplots(1, len(data.models), figsize=(max(7.0, 5.5 * len(data.models)), 5.2), squeeze=False)
    markers = "osD^v<>"
    colors = plt.get_cmap("tab10")
    for ax, model in zip(axes[0], data.models):
        for ri, row in enumerate(_rows(data)):
            for si, size in enumerate(data.sample_sizes):
                u, s = _get(data, size, model, row, "utility"), _get(data, size, model, row, "safety")
                if u.mean is None or s.mean is None or (row == "base" and si > 0):
                    continue
                xe, ye = _err(u), _err(s)
                ax.errorbar(u.mean, s.mean, xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]],
                            fmt=markers[si % len(markers)], color=colors(ri % 10), capsize=3, ms=7,
                            label=f"{row}" + ("" if row == "base" else f" n={size}"))
        ax.set_title(model)
        ax.set_xlabel(f"utility: {data.metrics['utility']}")
        ax.set_ylabel(f"safety: {data.metrics['safety']}")
        _clip_rates(ax, data, model, "utility", "x")
        _clip_rates(ax, data, model, "safety", "y")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{data.study}: safety vs utility{data.split_label}\nmean and 95% t-interval over seeds (axes cut at [0, 1])")
    fig.tight_layout()
    return fig


def _clip_rates(ax, data: ReportData, model: str, col: str, axis: str) -> None:
    """Rates live in [0, 1]: keep the axis there (a 2-seed t-interval can reach far beyond it)."""
    means = [c.mean for c in data.cells if c.model == model and c.column == col and c.mean is not None]
    if means and all(0.0 <= m <= 1.0 for m in means):
        (ax.set_xlim if axis == "x" else ax.set_ylim)(-0.05, 1.05)


def plot_tax(data: ReportData):
    plt = _plt()
    rows = ["safety", *data.methods]
    fig, axes = plt.subplots(1, len(data.models), figsize=(max(7.0, 5.5 * len(data.models)), 4.5), squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, model in zip(axes[0], data.models):
        for ri, row in enumerate(rows):
            xs, ys, errs, notes = [], [], [[], []], []
            for si, size in enumerate(data.sample_sizes):
                c = _get(data, size, model, row, "tax")
                if c.mean is None:
                    continue
                notes.append(c.note)
                xs.append(si + (ri - (len(rows) - 1) / 2) * width)
                ys.append(c.mean)
                e = _err(c)
                errs[0].append(e[0])
                errs[1].append(e[1])
            if xs:
                ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=row)
                for x, y, note in zip(xs, ys, notes):
                    ax.annotate(note.replace(" defined", ""), (x, y), ha="center", va="bottom", fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(data.sample_sizes)), [f"n={s}" for s in data.sample_sizes])
        ax.set_title(model)
        ax.set_ylabel("safety tax (utility loss / safety gain)")
        ax.set_xlabel("k/n: seeds where the tax is defined")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{data.study}: safety tax{data.split_label} (seeds where defined; 95% t-interval)")
    fig.tight_layout()
    return fig


def plot_vs_size(data: ReportData):
    plt = _plt()
    cols = ("safety", "overrefusal", "utility")
    fig, axes = plt.subplots(len(cols), len(data.models), figsize=(5.2 * len(data.models), 3.3 * len(cols)),
                             squeeze=False)
    numeric = all(_size_key(s)[0] == 0 for s in data.sample_sizes)
    xs_all = [float(s) if numeric else i for i, s in enumerate(data.sample_sizes)]
    for j, model in enumerate(data.models):
        for i, col in enumerate(cols):
            ax = axes[i][j]
            for row in _rows(data):
                cells = [_get(data, size, model, row, col) for size in data.sample_sizes]
                pts = [(x, c) for x, c in zip(xs_all, cells) if c.mean is not None]
                if not pts:
                    continue
                if row == "base":
                    ax.axhline(pts[0][1].mean, ls="--", color="gray", label="base")
                    continue
                x = [p[0] for p in pts]
                (line,) = ax.plot(x, [p[1].mean for p in pts], marker="o", label=row)
                if all(p[1].ci_low is not None for p in pts):
                    ax.fill_between(x, [p[1].ci_low for p in pts], [p[1].ci_high for p in pts], alpha=0.12,
                                    color=line.get_color())
            ax.set_title(f"{model}: {TITLES[col]}", fontsize=9)
            ax.set_xlabel("sample size")
            _clip_rates(ax, data, model, col, "y")
            if numeric and len(xs_all) > 1 and max(xs_all) >= 4 * min(xs_all) > 0:
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(xs_all, data.sample_sizes)
            ax.set_ylabel(data.metrics[col], fontsize=7)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def merge_spectra(client: Any, experiment_id: str, work: Path, limit: int = 6) -> list[dict[str, Any]]:
    """One SST merge report per (model, sample size, method) that has eigenvalues (the lowest seed)."""
    from sst_lab.tracking.aggregation import coordinates, fetch_runs, run_order

    runs = [r for r in fetch_runs(client, experiment_id)
            if r.data.tags.get("stage") == "merge" and r.info.status == "FINISHED"]
    by_id = {r.info.run_id: r for r in runs}
    chosen: dict[tuple, Any] = {}
    for r in sorted(runs, key=lambda r: (r.data.tags.get("seed", ""), run_order(r.info.start_time, r.info.run_id))):
        if not str(r.data.tags.get("merge_method", "")).startswith("sst"):
            continue
        c = coordinates(r.data.tags, by_id)
        chosen.setdefault((c["model"], c["sample_size"], c["method"]), r)
    out = []
    for (model, size, method), r in sorted(chosen.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][1]), kv[0][2])):
        if len(out) >= limit:
            break
        try:
            path = client.download_artifacts(r.info.run_id, "merge_report.json", str(work))
        except (MlflowException, OSError) as exc:  # every FINISHED merge run logs it: a gap is an error
            raise ValueError(f"merge run {r.info.run_id} ({method}) has no merge_report.json, so its SST "
                             f"eigen-spectrum cannot be plotted: {exc}") from exc
        report = json.loads(Path(path).read_text())
        spectra = {name: (m.get("eigenvalues") or m.get("top_eigenvalues"), m.get("k"))
                   for name, m in report.get("modules", {}).items()
                   if isinstance(m.get("eigenvalues") or m.get("top_eigenvalues"), list)}
        if spectra:
            out.append({"model": model, "sample_size": size, "method": method, "run_id": r.info.run_id,
                        "seed": r.data.tags.get("seed"), "spectra": spectra})
    return out


def plot_spectra(spectra: list[dict[str, Any]]):
    plt = _plt()
    if not spectra:
        return None
    fig, axes = plt.subplots(1, len(spectra), figsize=(5 * len(spectra), 4), squeeze=False)
    for ax, item in zip(axes[0], spectra):
        ks = set()
        for name, (values, k) in item["spectra"].items():
            vals = [max(float(v), 1e-12) for v in values]
            ax.semilogy(range(1, len(vals) + 1), vals, lw=0.8, alpha=0.5)
            if k is not None:
                ks.add(int(k))
        for k in ks:
            ax.axvline(k + 0.5, color="red", ls="--", lw=1, label=f"k={k}")
        ax.set_title(f"{item['model']} n={item['sample_size']} {item['method']} (seed {item['seed']})", fontsize=9)
        ax.set_xlabel("eigenvalue index (descending)")
        ax.set_ylabel("generalized eigenvalue λ")
        ax.grid(alpha=0.3)
        if ks:
            ax.legend(fontsize=7)
    fig.suptitle(f"SST eigen-spectra, one line per module ({len(spectra[0]['spectra'])} modules)")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ html
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def render_table(data: ReportData, size: str) -> str:
    e = html.escape
    head1 = "".join(f'<th colspan="{len(COLUMNS)}">{e(m)}</th>' for m in data.models)
    head2 = "".join(f"<th>{e(TITLES[c])}</th>" for _ in data.models for c in COLUMNS)
    body = []
    for row in _rows(data):
        tds = []
        for model in data.models:
            for col in COLUMNS:
                c = _get(data, size, model, row, col)
                title = (f"{c.metric}: [{c.ci_low:.4f}, {c.ci_high:.4f}]" if c.ci_low is not None else c.metric)
                rid = f' data-run="{c.aggregate_run_id}"' if c.aggregate_run_id else ""
                tds.append(f'<td title="{e(title)}"{rid}>{e(c.text())}</td>')
        label = f"{row} (reference)" if row == data.reference_method else row
        body.append(f"<tr><th>{e(label)}</th>{''.join(tds)}</tr>")
    notes = "".join(f"<li>{e(n)}</li>" for n in invalid_notes(data, size))
    return (f"<h3>sample size {e(size)}{e(data.split_label)}</h3><table><tr><th rowspan=2>model / method</th>{head1}</tr>"
            f"<tr>{head2}</tr>{''.join(body)}</table>" + (f"<p>Notes:</p><ul>{notes}</ul>" if notes else ""))


def invalid_notes(data: ReportData, size: str) -> list[str]:
    """One line per evaluate aggregate of this sample size (or size-free) with seeds whose suite was invalid."""
    out = []
    for a in data.aggs:
        if a.stage in ("evaluate", GROUP_STAGE) and a.sample_size in (size, "none") and a.model in data.models:
            for suite, seeds in sorted(a.invalid_seeds().items()):
                who = a.role if a.method == "none" else f"{a.role} {a.method}"
                out.append(f"{a.model} {who}: suite {suite} was invalid (too many empty or degenerate responses) "
                           f"in seed(s) {', '.join(seeds)} of {a.tags.get('aggregate.n_members', '?')}; those seeds "
                           f"are left out of its means (aggregate run {a.run_id})")
    return out


def render_html(data: ReportData, images: Mapping[str, bytes], extra: str = "") -> str:
    e = html.escape
    legend = ("Cells: mean ± half-width of the 95% Student-t interval over seeds (number of seeds). "
              f"* on a merged method's safety / over-refusal / utility: paired t-test across seeds against "
              f"{e(data.reference_method or '-')} with p &lt; {ALPHA} (▲ higher, ▼ lower; in a study with a "
              "selection, p Holm-adjusted over all pairs of methods). "
              "* on a safety tax: its interval excludes 0; k/n: seeds where the tax is defined "
              "(the safety gain was significant). — : not measured.")
    metrics = "".join(f"<li>{e(TITLES[c])}: <code>{e(m)}</code></li>" for c, m in data.metrics.items())
    imgs = "".join(f'<h3>{e(name)}</h3><img alt="{e(name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(png).decode()}"/>' for name, png in images.items())
    tables = "".join(render_table(data, s) for s in data.sample_sizes)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(data.study)} report</title>"
            f"<style>{style}</style></head><body><h1>Study {e(data.study)}</h1>"
            f"<p>{len(data.aggs)} aggregate runs; models {e(', '.join(data.models))}; methods "
            f"{e(', '.join(data.methods))}.</p><ul>{metrics}</ul><p>{legend}</p>{extra}{tables}{imgs}</body></html>")


def write_report(data: ReportData, spectra: list[dict[str, Any]], out_dir: Path,
                 selection: dict[str, Any] | None = None) -> dict[str, Path]:
    """Render everything into ``out_dir`` (created atomically; never overwritten). ``selection``:
    tracking.selection_report.selection_section (validation frontiers, chosen settings on test)."""
    from sst_lab.io import atomic_dir, write_json_atomic, write_text_atomic
    from sst_lab.tracking import selection_report

    figs = {"pareto": plot_pareto(data), "safety_tax": plot_tax(data), "metrics_vs_sample_size": plot_vs_size(data)}
    if selection is not None:
        figs = {"selection_frontiers": selection_report.plot_selection(selection), **figs}
    spec = plot_spectra(spectra)
    if spec is not None:
        figs["sst_eigen_spectra"] = spec
    images = {name: _png(fig) for name, fig in figs.items()}
    with atomic_dir(out_dir) as tmp:
        for name, png in images.items():
            (tmp / f"{name}.png").write_bytes(png)
        extra = selection_report.render_section(selection) if selection is not None else ""
        write_text_atomic(tmp / "report.html", render_html(data, images, extra))
        write_json_atomic(tmp / "report_table.json", {"study": data.study, "metrics": data.metrics,
                                                      "reference_method": data.reference_method,
                                                      "cells": [vars(c) for c in data.cells],
                                                      "selection": selection})
    return {p.stem: p for p in out_dir.iterdir()}
