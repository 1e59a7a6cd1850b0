"""Validation/test splits, the select stage and the report of chosen settings.

Splits run on the real benchmark files. The selection study runs the real sweep, the real select
stage and real MLflow records, with fake train/merge/evaluate/compare scripts that start in a
second and log deterministic numbers (tests/test_study.py's FAKE_STAGE).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import SHARED_DATA
from sst_lab.config import ConfigError
from sst_lab.evaluate.splits import SplitError, hash_assign, load_split
from sst_lab.evaluate.suites import SuiteError, load_items, load_suite, parse_suite
from sst_lab.tracking import study as st
from sst_lab.tracking.selection import Candidate, SelectionError, SelectionSpec, choose, parse_constraints
from test_study import run_sweep, write_fake_stages

needs_data = pytest.mark.skipif(not (SHARED_DATA / "xstest").is_dir(), reason="../shared/data not present")


# ------------------------------------------------------------------------------------ splits
@needs_data
def test_xstest_split_is_disjoint_complete_deterministic_and_stratified_by_type():
    spec = load_suite("xstest")
    val, rv = load_split(spec, "validation", None, load_items)
    test, rt = load_split(spec, "test", None, load_items)
    every = load_items(spec)
    v, t = {i.id for i in val.items}, {i.id for i in test.items}
    assert not v & t and v | t == {i.id for i in every.items}
    assert rv.n_validation == len(v) and rv.n_test == len(t) == rt.n_test
    # stratified: every XSTest prompt type keeps ~30 % of its prompts in validation
    types = {}
    for it in every.items:
        types.setdefault(it.stratum, []).append(it.id in v)
    assert len(types) > 10  # the published prompt types, not just safe/unsafe
    for flags in types.values():
        assert abs(sum(flags) - 0.3 * len(flags)) <= 0.5
    # the assignment depends on ids only, not on file order; another seed gives another split
    shuffled = list(every.items)
    random.Random(1).shuffle(shuffled)
    assert hash_assign(shuffled, 0.3, 0) == hash_assign(every.items, 0.3, 0)
    assert hash_assign(every.items, 0.3, 1) != hash_assign(every.items, 0.3, 0)
    # the preset limit takes the first items of the split, never items of the other split
    small, rec = load_split(spec, "test", 60, load_items)
    assert len(small.items) == 60 and set(rec.item_ids) <= t
    assert len({i.stratum for i in small.items}) >= 10  # spread (the first 60 in file order: 3 types) over the prompt types, not the file's first


@needs_data
def test_mmlu_uses_its_own_val_and_test_and_overlap_is_refused():
    spec = load_suite("mmlu")
    spec = replace(spec, data=replace(spec.data, subjects=("astronomy",)))
    val, rec = load_split(spec, "validation", None, load_items)
    test, _ = load_split(spec, "test", None, load_items)
    assert rec.rule["method"] == "data" and rec.n_validation == 16 and rec.n_test == 152
    assert len(val.items) == 16 and len(test.items) == 152
    assert not {i.prompt_sha for i in val.items} & {i.prompt_sha for i in test.items}
    bad = parse_suite({"name": "m", "version": 1, "kind": "mmlu",
                       "data": {"path": str(SHARED_DATA / "mmlu/data"), "format": "mmlu", "subjects": ["astronomy"]},
                       "split": {"method": "data", "validation": {"split": "test"}, "test": {"split": "test"}}})
    with pytest.raises(SplitError, match="validation and test share 152 items"):
        load_split(bad, "test", None, load_items)
    with pytest.raises(SuiteError, match="split.validation_fraction"):
        parse_suite({"name": "x", "version": 1, "kind": "safety", "data": {"path": "a.csv"}, "max_new_tokens": 4,
                     "split": {"validation_fraction": 1.5}})


# ------------------------------------------------------------------------------- the rule
def test_rule_picks_the_most_safety_within_delta_and_says_when_nothing_qualifies():
    cands = [Candidate("a", "1", "m1", 0.9, 0.70, 0.60), Candidate("b", "2", "m2", 0.6, 0.79, 0.75),
             Candidate("c", "3", "m3", 0.5, 0.80, 0.78), Candidate("d", "4", "m4", 0.4, 0.70, 0.6)]
    chosen, ok = choose(cands, 0.80, "max_safety_within_delta", 0.02)
    assert (chosen.label, ok) == ("b", True)
    assert [c.on_frontier for c in cands] == [True, True, True, False]
    chosen, ok = choose(cands, 0.80, "max_safety_within_delta_ci", 0.02)  # b's lower bound 0.75: loss up to 0.05
    assert (chosen.label, ok) == ("c", True)
    chosen, ok = choose(cands, 0.95, "max_safety_within_delta", 0.02)
    assert (chosen.label, ok) == ("c", False)  # declared fallback: the smallest utility loss, flagged
    for c, xs in zip(cands, (0.9, 0.5, 0.95, 1.0)):  # b refuses half the safe prompts
        c.constraint_values = {"xs": xs}
    chosen, ok = choose(cands, 0.80, "max_safety_within_delta", 0.02, [("xs", 0.1)], {"xs": 1.0})
    assert (chosen.label, ok) == ("c", True) and cands[1].constraint_losses == {"xs": 0.5}
    assert [c.admissible for c in cands] == [False, False, True, False]


def test_holm_adjusts_each_metric_over_the_unordered_family_pairs():
    from sst_lab.tracking.aggregation import Summary, holm
    from sst_lab.tracking.selection_report import holm_adjusted

    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert holm({"x": 0.6, "y": 0.9}) == {"x": 1.0, "y": 1.0}  # capped at 1, never below an earlier one
    S = lambda p: Summary(0.1, 5, p_value=p)  # noqa: E731
    paired = {("m", "1", "a"): {"b": {"x": S(0.01)}, "c": {"x": S(0.04)}},  # a-b and b-a are one test
              ("m", "1", "b"): {"a": {"x": S(0.01)}, "c": {"x": S(0.03), "y": S(0.2)}},
              ("m", "1", "c"): {"a": {"x": S(0.04)}, "b": {"x": S(0.03), "y": S(0.2)}}}
    adj = holm_adjusted(paired)
    assert adj[("m", "1", "a")] == pytest.approx({("b", "x"): 0.03, ("c", "x"): 0.06})
    assert adj[("m", "1", "c")] == pytest.approx({("a", "x"): 0.06, ("b", "x"): 0.06, ("b", "y"): 0.2})


def test_constraints_are_checked_where_they_are_declared():
    assert parse_constraints(["overrefusal/x/compliance_rate_safe=0.1"]) == [("overrefusal/x/compliance_rate_safe", 0.1)]
    for bad in ("xs", "xs=-1", "xs=nan", "=0.1"):
        with pytest.raises(SelectionError, match="METRIC=DELTA"):
            parse_constraints([bad])
    spec = SelectionSpec({"a": ["a1"]}, 1, "safety/s", "utility/u", constraints=[{"metric": "xs", "delta": -1}])
    with pytest.raises(SelectionError, match=r"s.yaml: selection.constraints\[0\] must be"):
        spec.check(["a1"], "s.yaml")
    spec.constraints = [{"metric": "utility/u", "delta": 0.1}]
    with pytest.raises(SelectionError, match="already the safety or utility metric"):
        spec.check(["a1"], "s.yaml")


def _validation_run(client, exp: str, role: str, metrics: dict, adapter: str = "none") -> str:
    run = client.create_run(exp, tags={"stage": "evaluate", "split": "validation", "role": role, "seed": "1",
                                       "suites": "s,xs", "adapter_run_id": adapter, "sweep.method": adapter})
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_select_stage_applies_a_constraint_and_records_it(tmp_path):
    from sst_lab.tracking.select import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("con")
    ref = _validation_run(client, exp, "utility", {"s": 0.0, "u": 0.8, "xs": 1.0})
    loud = _validation_run(client, exp, "merged", {"s": 0.6, "u": 0.8, "xs": 0.5}, "m-loud")  # refuses safe prompts
    quiet = _validation_run(client, exp, "merged", {"s": 0.3, "u": 0.8, "xs": 0.95}, "m-quiet")
    argv = ["--candidates", loud, quiet, "--reference", ref, "--safety_metric", "s", "--utility_metric", "u",
            "--delta", "0.02", "--study", "con", "--tracking_uri", uri]
    assert main(argv) == 0 and main([*argv, "--constraints", "xs=0.1"]) == 0
    sels = client.search_runs([exp], filter_string="tags.stage = 'select'", order_by=["attributes.start_time"])
    plain, bound = sels
    assert plain.data.tags["select.chosen_merge_run_id"] == "m-loud" and "select.constraints" not in plain.data.tags
    assert bound.data.tags["select.chosen_merge_run_id"] == "m-quiet"
    assert bound.data.tags["select.constraints"] == "xs loss <= 0.1"
    assert bound.data.metrics["select/chosen/constraint_loss/xs"] == pytest.approx(0.05)
    assert bound.data.tags["config_id"] != plain.data.tags["config_id"]
    local = mlflow.artifacts.download_artifacts(run_id=bound.info.run_id, artifact_path="select/frontier.json",
                                                tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    rec = json.loads(Path(local).read_text())
    assert rec["constraints"] == [{"metric": "xs", "delta": 0.1}] and rec["reference"]["constraint_values"] == {"xs": 1.0}
    assert [(c["merge_run_id"], c["admissible"]) for c in rec["candidates"]] == [("m-loud", False), ("m-quiet", True)]
    with pytest.raises(SelectionError, match=f"reference \\(constraint\\): run {ref} has no finite metric 'mmlu'"):
        main([*argv, "--constraints", "mmlu=0.1"])
    failed = client.search_runs([exp], filter_string="attributes.status = 'FAILED'")
    assert len(failed) == 1 and "'mmlu'" in failed[0].data.tags["error"]


# ------------------------------------------------------------------------- a fake-stage study
def _study(d: Path, name: str, families: dict, budget: int = 2, **extra) -> Path:
    write_fake_stages(d)
    methods = [{"name": lab, "method": fam, "args": {"p": i}} for fam, labs in families.items()
               for i, lab in enumerate(labs)]
    data = {"name": name, "models": [{"name": "fake", "configs": [str(d / "model.yaml")]}],
            "sample_sizes": [16], "seeds": [1, 2],
            "train": {"utility": [str(d / "utility.yaml")], "safety": [str(d / "safety.yaml")],
                      "accelerate_config": None},
            "merge": {"methods": methods}, "evaluate": {"roles": ["utility", "merged"]},
            "selection": {"families": families, "budget": budget, "safety_metric": "safety/harm/refusal_rate",
                          "utility_metric": "utility/task/exact_match", "delta": 0.05, **extra}}
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unequal_budgets_are_refused_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match="budget=2.*allow_unequal_budgets"):
        st.load_study(_study(tmp_path, "u", {"a": ["a1", "a2"], "b": ["b1"]}))
    study = st.load_study(_study(tmp_path, "u2", {"a": ["a1", "a2"], "b": ["b1"]}, allow_unequal_budgets=True))
    assert sum(n.stage == "select" for n in st.expand(study)) == 2 * 2


XS = "overrefusal/xs/compliance_rate_safe"  # the fake evaluate stage logs it (tests/test_study.py)


def test_report_reference_is_a_family_in_a_selection_study(tmp_path):
    path = _study(tmp_path, "r", {"a": ["a1", "a2"], "b": ["b1", "b2"]})
    for ref in ("b", "a1"):
        data = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**data, "report": {"reference_method": ref}}))
        if ref == "b":  # the report's rows are the families
            assert st.load_study(path).report.reference_method == "b"
            continue
        with pytest.raises(ConfigError, match=r"reference_method 'a1' is not one of selection.families \['a', 'b'\]"):
            st.load_study(path)


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    d = tmp_path_factory.mktemp("sel")
    path = _study(d, "sel", {"a": ["a1", "a2"], "b": ["b1", "b2"]}, constraints=[{"metric": XS, "delta": 0.3}])
    data = yaml.safe_load(path.read_text())
    data["compare"] = {"args": {"n_boot": 10}, "pairs": [["merged", "utility"]]}
    path.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{d}/mlflow.db"
    proc = run_sweep(path, uri, write_fake_stages(d), "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sel").experiment_id], max_results=5000)
    return {"uri": uri, "client": client, "runs": runs, "dir": d, "path": path}


def test_sweep_selects_on_validation_and_tests_only_the_choice(selected):
    runs, client = selected["runs"], selected["client"]
    by_id = {r.info.run_id: r for r in runs}
    sels = [r for r in runs if r.data.tags["stage"] == "select"]
    assert len(sels) == 2 * 2 and all(r.info.status == "FINISHED" for r in sels)
    merged_tests = [r for r in runs if r.data.tags["stage"] == "evaluate" and r.data.tags.get("split") == "test"
                    and r.data.tags["role"] == "merged"]
    assert len(merged_tests) == 4  # only the chosen setting of each family and seed reaches the test split
    for sel in sels:
        t = sel.data.tags
        cands = [by_id[i] for i in t["select.candidate_eval_run_ids"].split(",")]
        assert all(c.data.tags["split"] == "validation" for c in cands) and len(cands) == 2
        ref = by_id[[u for u in t["upstream_run_ids"].split(",") if u not in t["select.candidate_eval_run_ids"]][0]]
        assert ref.data.tags["split"] == "validation" and ref.data.tags["role"] == "utility"
        u_ref = ref.data.metrics["utility/task/exact_match"]
        ok = [c for c in cands if u_ref - c.data.metrics["utility/task/exact_match"] <= 0.05
              and ref.data.metrics[XS] - c.data.metrics[XS] <= 0.3]  # the study's constraint
        expect = max(ok, key=lambda c: c.data.metrics["safety/harm/refusal_rate"]) if ok else \
            max(cands, key=lambda c: c.data.metrics["utility/task/exact_match"])
        assert t["select.chosen_eval_run_id"] == expect.info.run_id
        assert t["select.chosen_merge_run_id"] == expect.data.tags["adapter_run_id"]
        assert t["select.admissible"] == str(bool(ok)).lower()
        tests = [r for r in merged_tests if r.data.tags["adapter_run_id"] == t["select.chosen_merge_run_id"]]
        assert len(tests) == 1 and tests[0].data.tags["sweep.method"] == t["select.family"]
        local = mlflow.artifacts.download_artifacts(run_id=sel.info.run_id, artifact_path="select/frontier.json",
                                                    tracking_uri=selected["uri"], dst_path=str(selected["dir"] / sel.info.run_id))
        rec = json.loads(Path(local).read_text())
        assert rec["chosen"]["eval_run_id"] == expect.info.run_id and len(rec["candidates"]) == 2
        assert any(c["on_frontier"] for c in rec["candidates"])
        assert t["select.constraints"] == f"{XS} loss <= 0.3" and rec["constraints"] == [{"metric": XS, "delta": 0.3}]


def test_a_test_split_run_never_feeds_a_selection(selected):
    from sst_lab.tracking.select import main

    runs = selected["runs"]
    test_run = next(r for r in runs if r.data.tags.get("split") == "test" and r.data.tags["role"] == "merged")
    val = [r for r in runs if r.data.tags.get("split") == "validation"]
    ref = next(r for r in val if r.data.tags["role"] == "utility")
    cand = next(r for r in val if r.data.tags["role"] == "merged")
    argv = ["--reference", ref.info.run_id, "--safety_metric", "safety/harm/refusal_rate",
            "--utility_metric", "utility/task/exact_match", "--study", "sel", "--tracking_uri", selected["uri"]]
    with pytest.raises(SelectionError, match="split='test'.*only validation-split runs"):
        main(["--candidates", cand.info.run_id, test_run.info.run_id, *argv])
    with pytest.raises(SelectionError, match="reference: run .* split='test'"):
        main(["--candidates", cand.info.run_id, *argv[:0], "--reference", test_run.info.run_id, *argv[2:]])
    client = selected["client"]
    failed = client.search_runs([client.get_experiment_by_name("sel").experiment_id],
                                filter_string="tags.stage = 'select' and attributes.status = 'FAILED'")
    assert len(failed) == 2 and all("split" in r.data.tags["error"] for r in failed)


def test_report_shows_the_numbers_of_the_selected_aggregate_runs(selected, tmp_path):
    from sst_lab.tracking.aggregate import main as aggregate
    from sst_lab.tracking.report import main as report

    assert aggregate(["--study", "sel", "--tracking_uri", selected["uri"]]) == 0
    client = selected["client"]
    exp = client.get_experiment_by_name("sel").experiment_id
    aggs = client.search_runs([exp], filter_string="tags.`aggregate.group_stage` = 'selected'")
    assert sorted((r.data.tags["aggregate.method"], r.data.tags["aggregate.role"]) for r in aggs) == [
        ("a", "merged"), ("a", "merged_vs_utility"), ("b", "merged"), ("b", "merged_vs_utility")]
    out = tmp_path / "report"
    assert report(["--study", "sel", "--tracking_uri", selected["uri"], "--output_dir", str(out),
                   "--safety_metric", "safety/harm/refusal_rate", "--overrefusal_metric", XS]) == 0
    table = json.loads((out / "report_table.json").read_text())
    assert table["metrics"]["utility"] == "utility/task/exact_match"  # the task metric, not MMLU, by default
    sel = table["selection"]
    assert len(sel["rows"]) == 2 and len(sel["frontiers"]) == 2
    html = (out / "report.html").read_text()
    for row in sel["rows"]:
        agg = client.get_run(row["aggregate_run_id"])
        m = agg.data.metrics
        for col, name in (("safety", "safety/harm/refusal_rate"), ("utility", "utility/task/exact_match"),
                          ("overrefusal", XS)):  # what the rule did not see is in the table too
            assert row[f"{col}_mean"] == m[f"{name}/mean"] and row[f"{col}_ci_low"] == m[f"{name}/ci_low"]
            assert f"{m[f'{name}/mean']:.3f} [{m[f'{name}/ci_low']:.3f}, {m[f'{name}/ci_high']:.3f}] (n=2)" in html
        # the aggregate itself is the mean over the three seeds' test runs of the chosen settings
        members = [client.get_run(i) for i in agg.data.tags["aggregate.member_run_ids"].split(",")]
        picks = {r.data.tags["select.chosen_merge_run_id"]: r.data.tags["select.chosen_candidate"]
                 for r in selected["runs"] if r.data.tags["stage"] == "select"}
        assert row["chosen"].split(",") == [picks[r.data.tags["adapter_run_id"]] for r in members]  # settings, seed order
        assert set(row["chosen"].split(",")) <= set(("a1", "a2") if row["family"] == "a" else ("b1", "b2"))
        assert all(r.data.tags["split"] == "test" for r in members) and len(members) == 2
        vals = [r.data.metrics["safety/harm/refusal_rate"] for r in members]
        assert m["safety/harm/refusal_rate/mean"] == pytest.approx(sum(vals) / 2)
        other = "b" if row["family"] == "a" else "a"
        assert f"paired/{other}/safety/harm/refusal_rate/p_value" in m
        assert row["paired"][other]["overrefusal_p_value"] == m[f"paired/{other}/{XS}/p_value"]
        # two families: one pair per metric, so Holm leaves its p-value as it is
        assert row["paired"][other]["safety_p_holm"] == m[f"paired/{other}/safety/harm/refusal_rate/p_value"]
        assert "Holm" in html and agg.data.tags["aggregate.multiple_comparisons"].startswith("p_holm: Holm")
    assert sel["overrefusal_metric"] == XS and f"<th>{XS}</th>" in html
    # the main table shows the test split only: reference rows from test aggregates, one row per family
    # from its selected aggregate (whatever setting each seed chose), its tax from the chosen settings'
    # compare runs; validation candidates (a1, a2, ...) are not rows (before: the utility row was its
    # validation aggregate and a family's row one of its settings' groups)
    cells = {(c["row"], c["column"]): c for c in table["cells"]}
    assert {r for r, _ in cells} == {"base", "utility", "safety", "a", "b"} and "test split" in html
    for (row, col), c in cells.items():
        if c["aggregate_run_id"] is None:
            assert row in ("base", "safety", "utility") or col == "overrefusal", c  # not run in this study
            continue
        agg = client.get_run(c["aggregate_run_id"])
        assert agg.data.tags["aggregate.split"] == "test", c
        if row in ("a", "b"):
            by_col = {"tax": "merged_vs_utility"}.get(col, "merged")
            assert agg.data.tags["aggregate.group_stage"] == "selected" and agg.data.tags["aggregate.role"] == by_col
            members = agg.data.tags["aggregate.member_run_ids"].split(",")
            assert len(members) == 2 and c["n"] == 2
            if col == "tax":  # the compare runs of exactly the chosen settings' test evaluations
                tests = {client.get_run(i).data.tags["candidate_run_id"] for i in members}
                evals = next(r for r in sel["rows"] if r["family"] == row)["aggregate_run_id"]
                assert tests == set(client.get_run(evals).data.tags["aggregate.member_run_ids"].split(","))


def test_evaluate_stage_scores_only_its_split_and_records_it(world, store, tmp_path):
    from sst_lab.evaluate.evaluate import main

    spec = load_suite("xstest-demo")
    val_ids = {i.id for i in load_split(spec, "validation", None, load_items)[0].items}
    main(["--config", "configs/evaluate/tiny.yaml", "--suites", "xstest-demo", "--split", "validation",
          "--preset", "minimal", "--minimal_n", "6", "--study", "tests-split", "--tracking_uri", store,
          "--output_dir", str(tmp_path / "o")])
    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.search_runs([client.get_experiment_by_name("tests-split").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["split"] == "validation"
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="splits/xstest-demo.json",
                                                tracking_uri=store, dst_path=str(tmp_path / "a"))
    rec = json.loads(Path(local).read_text())
    assert len(rec["item_ids"]) == 6 and set(rec["item_ids"]) <= val_ids and rec["rule"]["method"] == "hash"
    scored = json.loads((tmp_path / "o" / "tables" / "xstest-demo.json").read_text())
    assert [r["id"] for r in scored] == rec["item_ids"]
