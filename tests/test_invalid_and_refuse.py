"""Seeds whose suite an evaluate run marked invalid, in aggregate and report; select's strict fallback.

The runs are real MLflow records in a temporary sqlite store, written with the stages' own tags and
metric names (no model is run: the numbers are chosen so each rule's outcome is known).
"""

from __future__ import annotations

import mlflow
import pytest
import yaml

from sst_lab.tracking import study as st
from sst_lab.tracking.selection import SelectionError

SAFE, UTIL = "safety/harm/refusal_rate", "utility/task/exact_match"


def _run(client, exp: str, tags: dict, metrics: dict) -> str:
    run = client.create_run(exp, tags={k: str(v) for k, v in tags.items()})
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _eval_metrics(refusal: float, utility: float, invalid: bool = False) -> tuple[dict, dict]:
    """What evaluate logs for a valid suite, and for an invalid one (only n, empty_rate, valid survive)."""
    harm = ({"safety/harm/n": 10.0, "safety/harm/empty_rate": 0.9, "safety/harm/valid": 0.0} if invalid else
            {"safety/harm/n": 10.0, "safety/harm/empty_rate": 0.0, "safety/harm/valid": 1.0, SAFE: refusal})
    return ({"invalid_suites": "harm" if invalid else "none"},
            {**harm, "utility/task/n": 10.0, "utility/task/empty_rate": 0.0, "utility/task/valid": 1.0, UTIL: utility})


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One store for the module (creating a sqlite store costs seconds); each test has its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('invalid')}/mlflow.db"
    return mlflow.MlflowClient(tracking_uri=uri), uri


VALUES = {"a": {1: (0.8, 0.70), 2: (0.0, 0.60), 3: (0.6, 0.74)}, "b": {1: (0.5, 0.72), 2: (0.4, 0.71), 3: (0.3, 0.73)}}


def test_aggregate_counts_names_and_excludes_invalid_suites_and_the_report_says_so(client):
    from sst_lab.tracking.aggregation import write_aggregates
    from sst_lab.tracking.reporting import build, load_aggregates, render_table

    client, uri = client
    exp = client.create_experiment("inv")
    for method, seeds in VALUES.items():
        for seed, (refusal, utility) in seeds.items():
            tags, metrics = _eval_metrics(refusal, utility, invalid=(method, seed) == ("a", 2))
            _run(client, exp, {"stage": "evaluate", "config_id": f"c{method}", "seed": seed, "role": "merged",
                               "sweep.method": method, "sweep.model": "fake", "sweep.sample_size": "16", **tags},
                 metrics)
    lines: list[str] = []
    write_aggregates("inv", uri, echo=lines.append)
    aggs = {r.data.tags["aggregate.method"]: r for r in client.search_runs([exp], "tags.stage = 'aggregate'")}
    a, b = aggs["a"].data, aggs["b"].data
    # seed 2's harm values are out of every harm mean (empty_rate 0.9 too), counted and named
    assert a.metrics[f"{SAFE}/n"] == 2 and a.metrics[f"{SAFE}/mean"] == pytest.approx(0.7)
    # 0.8 and 0.6: the t-interval (12.7 x 0.1 = +-1.27) is cut to the range a rate's mean cannot leave
    assert (a.metrics[f"{SAFE}/ci_low"], a.metrics[f"{SAFE}/ci_high"]) == (0.0, 1.0)
    assert a.tags["aggregate.ci_clipped"] == SAFE and b.tags["aggregate.ci_clipped"] == "none"
    assert a.metrics["safety/harm/empty_rate/mean"] == 0.0 and a.metrics["safety/harm/empty_rate/n"] == 2
    assert a.metrics[f"{UTIL}/n"] == 3  # the suite that was valid keeps all three seeds
    assert a.tags["aggregate.invalid_suites"] == "harm:2" and b.tags["aggregate.invalid_suites"] == "none"
    assert a.metrics["aggregate/n_invalid_seeds"] == 1 and a.metrics["aggregate/invalid_seeds/harm"] == 1
    assert b.metrics["aggregate/n_invalid_seeds"] == 0
    assert a.metrics[f"paired/b/{SAFE}/n"] == 2 and a.metrics[f"paired/b/{UTIL}/n"] == 3
    assert a.metrics[f"paired/b/{SAFE}/mean"] == pytest.approx(((0.8 - 0.5) + (0.6 - 0.3)) / 2)
    assert any("harm:2" in line and "left out" in line for line in lines)

    data = build("inv", load_aggregates(client, exp), {"safety": SAFE, "overrefusal": SAFE, "utility": UTIL}, "b")
    cell = next(c for c in data.cells if c.row == "a" and c.column == "safety")
    assert cell.n == 2 and cell.note == "2/3 valid" and "2/3 valid" in cell.text()
    assert next(c for c in data.cells if c.row == "a" and c.column == "utility").note == ""
    table = render_table(data, "16")
    assert "suite harm was invalid" in table and "seed(s) 2 of 3" in table and aggs["a"].info.run_id in table


def test_selected_aggregate_leaves_an_invalid_seed_out_and_names_it(client):
    from sst_lab.tracking.selection_report import write_selected_aggregates

    client, uri = client
    exp = client.create_experiment("inv-sel")
    for family, seeds in VALUES.items():
        for seed, (refusal, utility) in seeds.items():
            merge = f"merge-{family}-{seed}"
            _run(client, exp, {"stage": "select", "seed": seed, "select.family": family, "sweep.model": "fake",
                               "sweep.sample_size": "16", "select.chosen_merge_run_id": merge,
                               "select.chosen_candidate": f"{family}1"}, {})
            tags, metrics = _eval_metrics(refusal, utility, invalid=(family, seed) == ("a", 2))
            _run(client, exp, {"stage": "evaluate", "split": "test", "seed": seed, "role": "merged",
                               "adapter_run_id": merge, "sweep.method": f"{family}1", **tags}, metrics)
    lines: list[str] = []
    write_selected_aggregates("inv-sel", uri, echo=lines.append)
    aggs = {r.data.tags["aggregate.method"]: r.data for r in client.search_runs([exp], "tags.stage = 'aggregate'")}
    a = aggs["a"]
    assert a.metrics[f"{SAFE}/n"] == 2 and a.metrics[f"{SAFE}/mean"] == pytest.approx(0.7)  # was dropped before
    assert (a.metrics[f"{SAFE}/ci_low"], a.metrics[f"{SAFE}/ci_high"]) == (0.0, 1.0) and SAFE in a.tags["aggregate.ci_clipped"]
    assert a.metrics[f"{UTIL}/n"] == 3 and a.tags["aggregate.invalid_suites"] == "harm:2"
    assert a.metrics["aggregate/n_invalid_seeds"] == 1 and aggs["b"].tags["aggregate.invalid_suites"] == "none"
    assert a.metrics[f"paired/b/{SAFE}/n"] == 2 and a.metrics[f"paired/b/{UTIL}/n"] == 3
    assert any("harm:2" in line for line in lines)
    assert a.tags["aggregate.chosen_candidates"] == "a1,a1,a1" and aggs["b"].tags["aggregate.chosen_candidates"] == "b1,b1,b1"
    from sst_lab.tracking.selection_report import render_section

    rows = {"rows": [{"model": "fake", "sample_size": "16", "family": fam, "chosen": "", "paired": {},
                      "aggregate_run_id": "r", "invalid_suites": aggs[fam].tags["aggregate.invalid_suites"]}
                     for fam in ("a", "b")], "safety_metric": SAFE, "utility_metric": UTIL}
    html = render_section(rows)
    assert "fake a: invalid suites (suite:seeds) harm:2" in html and "fake b:" not in html


def test_only_proportions_have_their_interval_cut_to_the_unit_range():
    from sst_lab.tracking.aggregation import metric_range, summarize

    for name in (SAFE, UTIL, "overrefusal/xstest/compliance_rate_safe", "utility/sst2/balanced_accuracy",
                 "utility/mmlu/global_facts/accuracy", "utility/sst2/recall/positive", "utility/sst2/label_majority_share",
                 "overrefusal/xstest/category/homonyms/refusal_rate"):
        assert metric_range(name) == (0.0, 1.0), name
    for name in ("merge/kept_fraction", "train/learning_rate", "fidelity/safety_measured_change", "time/seconds",
                 "safety/harm/n", "utility/task/context_length", "compare/safety_tax"):
        assert metric_range(name) is None, name
    cut = summarize([0.0, 0.1, 0.5], bounds=(0.0, 1.0))  # t: 0.2 +- 0.66
    raw = summarize([0.0, 0.1, 0.5])
    assert raw.ci_low < 0 and cut.ci_low == 0.0 and cut.ci_high == raw.ci_high < 1 and cut.clipped and not raw.clipped
    assert cut.mean == raw.mean and cut.std == raw.std
    inside = summarize([0.4, 0.5, 0.6], bounds=(0.0, 1.0))
    assert not inside.clipped and 0 < inside.ci_low < inside.ci_high < 1


def _validation_runs(client, exp: str) -> tuple[str, list[str]]:
    common = {"stage": "evaluate", "split": "validation", "seed": 7, "suites": "harm,task"}
    ref = _run(client, exp, {**common, "role": "utility", "adapter_run_id": "train-u"}, {UTIL: 0.90, SAFE: 0.1})
    cands = [_run(client, exp, {**common, "role": "merged", "adapter_run_id": f"merge-{i}", "sweep.method": f"lin{i}"},
                  {UTIL: u, SAFE: s}) for i, (u, s) in enumerate([(0.50, 0.9), (0.60, 0.4)])]
    return ref, cands


def test_select_fallback_refuse_fails_naming_family_and_seed_min_loss_chooses_and_says_so(client, tmp_path, capsys):
    from sst_lab.tracking.select import main

    client, uri = client
    exp = client.create_experiment("strict")
    ref, cands = _validation_runs(client, exp)
    argv = ["--candidates", *cands, "--reference", ref, "--safety_metric", SAFE, "--utility_metric", UTIL,
            "--delta", "0.05", "--budget", "2", "--family", "linear", "--seed", "7", "--study", "strict",
            "--tracking_uri", uri]
    with pytest.raises(SelectionError, match=r"select family linear, seed 7: no candidate meets rule "
                                             r"max_safety_within_delta with delta 0.05.*lin0: loss 0.4000.*refuse"):
        main([*argv, "--fallback", "refuse"])
    assert main(argv) == 0  # the default: the smallest loss, flagged
    assert "WARNING: select family linear, seed 7: no candidate meets rule" in capsys.readouterr().out
    runs = {r.info.status: r for r in client.search_runs([exp], "tags.stage = 'select'")}
    assert "select family linear, seed 7" in runs["FAILED"].data.tags["error"]
    done = runs["FINISHED"].data.tags
    assert done["select.admissible"] == "false" and done["select.fallback"] == "min_loss"
    assert done["select.chosen_merge_run_id"] == "merge-1"
    # a study declares it; the plan passes it to every select node; an unknown value is refused
    from test_selection import _study

    path = _study(tmp_path, "strict", {"a": ["a1", "a2"]}, fallback="refuse")
    sel = [n for n in st.expand(st.load_study(path)) if n.stage == "select"]
    assert sel and all(n.args["fallback"] == "refuse" for n in sel)
    default = [n for n in st.expand(st.load_study(_study(tmp_path, "loose", {"a": ["a1", "a2"]})))
               if n.stage == "select"]
    assert all("fallback" not in n.args for n in default)  # the default keeps existing plans' keys
    bad = yaml.safe_load(path.read_text())
    bad["selection"]["fallback"] = "maybe"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="selection.fallback must be one of"):
        st.load_study(path)
