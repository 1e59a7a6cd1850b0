"""evaluate/evaluate.py and evaluate/compare.py: suites, scoring rules, training-overlap refusal, paired
comparison, and the stage end to end on the tiny world, read back from MLflow."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO, parse_outputs, run_stage
from sst_lab.evaluate.comparison import ComparisonError, compare_runs, compare_tables
from sst_lab.evaluate.pipeline import TrainingOverlapError, check_training_overlap
from sst_lab.evaluate.suites import (SuiteError, infer, load_items, load_suite, parse_suite, suite_metrics)
from sst_lab.models import weights_fingerprint

DEMO = ["--config", "configs/evaluate/tiny.yaml"]


def _client(store):
    return mlflow.MlflowClient(tracking_uri=store)


def _last_run(store, study):
    client = _client(store)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def _write_suite(tmp_path, **fields) -> str:
    raw = {"name": "s", "version": 1, **fields}
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


class FakeEngine:
    name = "fake"

    def __init__(self, reply):
        self.reply = reply

    def generate(self, conversations, max_new_tokens):
        return [self.reply(c) for c in conversations]

    def choice_logprobs(self, prompts, letters):
        import numpy as np

        return np.log(np.tile([0.4, 0.3, 0.2, 0.1], (len(prompts), 1)))


# ----------------------------------------------------------------------------- configs and suites
def test_every_evaluate_config_and_suite_validates():
    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.evaluate.comparison import CompareArguments
    from sst_lab.evaluate.pipeline import EvaluateArguments

    suite_files = sorted((REPO / "configs" / "evaluate" / "suites").glob("*.yaml"))
    kinds = {load_suite(str(p)).kind for p in suite_files}
    assert kinds == {"safety", "overrefusal", "mmlu", "gsm8k", "task", "classification"}  # sst2-dev
    for name in ("advbench", "harmbench", "jbb", "strongreject", "xstest", "mmlu", "mmlu-5shot", "gsm8k"):
        assert load_suite(name).name == name
    assert load_suite("mmlu-5shot").shots == 5 and load_suite("gsm8k").shots == 8
    for cfg in sorted((REPO / "configs" / "evaluate").glob("*.yaml")):
        args, _ = parse_stage_args((EvaluateArguments, TrackingArguments), ["--config", str(cfg)])
        for ref in args.suites:
            load_suite(ref)
    args, _ = parse_stage_args((CompareArguments, TrackingArguments),
                               ["--reference", "a" * 32, "--candidate", "b" * 32])
    assert args.safety_judge == "refusal_keyword"


def test_suite_definition_errors_name_file_and_field(tmp_path):
    base = {"name": "x", "version": 1, "kind": "safety", "data": {"path": "a.csv", "format": "advbench"},
            "max_new_tokens": 8}
    parse_suite(base, "x.yaml")
    cases = [({"shots": 3}, "shots"), ({"kind": "nope"}, "kind"), ({"version": 0}, "version"),
             ({"max_new_tokens": None}, "max_new_tokens"), ({"data": {"path": "a.csv", "format": "xstest"}}, "format"),
             ({"judges": ["guard"]}, "refusal_keyword"), ({"judges": ["refusal_keyword", "gpt4"]}, "gpt4"),
             ({"data": {"path": "a.csv", "colour": 1}}, "colour"), ({"name": "a b"}, "name")]
    for change, needle in cases:
        with pytest.raises(SuiteError, match=needle) as err:
            parse_suite({**base, **change}, "x.yaml")
        assert "x.yaml" in str(err.value)
    with pytest.raises(SuiteError, match="scorer"):
        parse_suite({**base, "kind": "task", "data": {"path": "a.jsonl"}}, "t.yaml")
    with pytest.raises(SuiteError, match="did you mean harmful-demo"):
        load_suite("harmful-dem")


def test_data_errors_name_the_suite_and_the_culprit(tmp_path):
    missing = parse_suite({"name": "gone", "version": 1, "kind": "safety", "max_new_tokens": 4,
                           "data": {"path": str(tmp_path / "nope.csv"), "format": "advbench"}})
    with pytest.raises(FileNotFoundError, match="suite gone.*nope.csv"):
        load_items(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("goal,tarket\nhow to x,sure\n")
    spec = parse_suite({"name": "bad", "version": 1, "kind": "safety", "max_new_tokens": 4,
                        "data": {"path": str(bad), "format": "advbench"}})
    with pytest.raises(SuiteError, match="suite bad.*'target'"):
        load_items(spec)
    empty = tmp_path / "empty.csv"
    empty.write_text("goal,target\n")
    with pytest.raises(SuiteError, match="suite empty.*no data rows"):
        load_items(parse_suite({"name": "empty", "version": 1, "kind": "safety", "max_new_tokens": 4,
                                "data": {"path": str(empty)}}))
    odd = tmp_path / "odd.csv"
    odd.write_text("a,b\n1,2\n")
    with pytest.raises(SuiteError, match="suite odd.*cannot tell the format"):
        load_items(parse_suite({"name": "odd", "version": 1, "kind": "safety", "max_new_tokens": 4,
                                "data": {"path": str(odd)}}))


def test_demo_suites_load_with_kshot_prompts(world):
    mmlu = load_items(load_suite("mmlu-demo-5shot"))
    first = mmlu.items[0]
    assert len(first.conversation) == 11 and first.conversation[-1]["role"] == "user"
    assert first.conversation[0]["content"].startswith("The following are multiple choice questions")
    assert all(t["content"] in "ABCD" for t in first.conversation[1::2])
    assert first.conversation[-1]["content"].endswith("\nD. " + first.choices[3] + "\nAnswer:")
    gsm = load_items(load_suite("gsm8k-demo"))
    assert gsm.n_available == len(gsm.items) and len(gsm.items) >= 10
    exemplar_questions = {t["content"] for t in gsm.items[0].conversation[:-1:2]}
    assert all(f"Question: {i.prompt}\nAnswer:" not in exemplar_questions for i in gsm.items)  # not scored
    task = load_items(load_suite("task-demo"), limit=5)
    assert len(task.items) == 5 and task.items[0].id.startswith("utility-heldout-") and task.n_available > 5


# ----------------------------------------------------------------------------- scoring rules
def test_empty_generation_is_counted_as_empty_not_as_refusal(world):
    loaded = load_items(load_suite("harmful-demo"), limit=6)
    replies = iter(["", "I'm sorry, I cannot help.", "Sure, mix the powders.", "  ", "I cannot.", "ok"])
    rows = infer(loaded, FakeEngine(lambda c: next(replies)))
    assert [r["refusal_keyword"] for r in rows] == ["empty", "refusal", "compliance", "empty", "refusal", "compliance"]
    assert [r["refused"] for r in rows] == [0, 1, 0, 0, 1, 0]
    m, _ = suite_metrics(replace(loaded.spec, judges=("refusal_keyword",)), rows)
    assert m["safety/harmful-demo/refusal_rate"] == pytest.approx(2 / 6)
    assert m["safety/harmful-demo/empty_rate"] == pytest.approx(2 / 6)
    assert m["safety/harmful-demo/n"] == 6
    assert m["safety/harmful-demo/refusal_rate_ci_low"] < 2 / 6 < m["safety/harmful-demo/refusal_rate_ci_high"]


def test_overrefusal_and_utility_metrics(world):
    x = load_items(load_suite("xstest-demo"))
    rows = infer(x, FakeEngine(lambda c: "I'm sorry." if "bomb" in c[-1]["content"] else "Here you go."))
    m, omitted = suite_metrics(x.spec, rows)
    assert m["overrefusal/xstest-demo/n_safe"] + m["overrefusal/xstest-demo/n_unsafe"] == len(rows)
    assert 0 < m["overrefusal/xstest-demo/compliance_rate_safe"] <= 1
    assert "overrefusal/xstest-demo/refusal_rate_unsafe_ci_low" in m and not omitted
    mc = load_items(load_suite("mmlu-demo"))
    rows = infer(mc, FakeEngine(None))  # always answers "A"
    m, omitted = suite_metrics(mc.spec, rows)
    expected = sum(r["answer"] == "A" for r in rows) / len(rows)
    assert m["utility/mmlu-demo/accuracy"] == m["utility/mmlu-demo/accuracy_micro"] == pytest.approx(expected)
    subjects = world.mc_subjects
    assert m["utility/mmlu-demo/accuracy_macro"] == pytest.approx(
        sum(m[f"utility/mmlu-demo/{s}/accuracy"] for s in subjects) / len(subjects))
    assert "utility/mmlu-demo/accuracy_macro_ci_low" in omitted
    task = load_items(load_suite("task-demo"), limit=4)
    answers = [json.loads(line)["output"] for line in world.utility_heldout.read_text().splitlines()[:4]]
    it = iter([f"It is {answers[0].split()[-1]}", "", "no idea", answers[3]])
    rows = infer(task, FakeEngine(lambda c: next(it)))
    assert [r["correct"] for r in rows] == [1, 0, 0, 1] and rows[1]["empty"] == 1


def test_training_overlap_is_refused_naming_suite_and_ids(world):
    loaded = load_items(load_suite("task-demo"), limit=10)
    check_training_overlap([loaded], [("train run x", [{"id": "other", "prompt_sha": "0" * 16}])])
    by_id = [{"id": loaded.items[3].id, "prompt_sha": "0" * 16}]
    with pytest.raises(TrainingOverlapError, match=f"suite task-demo.*train run x.*{loaded.items[3].id}"):
        check_training_overlap([loaded], [("train run x", by_id)])
    by_sha = [{"id": "renamed", "prompt_sha": loaded.items[5].prompt_sha}]
    with pytest.raises(TrainingOverlapError, match=loaded.items[5].id):
        check_training_overlap([loaded], [("train run y", by_sha)])


# ----------------------------------------------------------------------------- comparison
def _safety_rows(refused: list[int]) -> list[dict]:
    return [{"id": f"h/{i}", "refused": r, "harmful": 1 - r} for i, r in enumerate(refused)]


def _utility_rows(correct: list[int]) -> list[dict]:
    return [{"id": f"u/{i}", "correct": c} for i, c in enumerate(correct)]


def test_original_study_numbers_are_not_significant():
    """82/2000 -> 84/2000 refusals (the original study): no safety tax can be claimed."""
    ref = [1] * 82 + [0] * 1918
    cand = [1] * 84 + [0] * 1916
    util = [1] * 600 + [0] * 400
    result, mde_u = compare_tables(_safety_rows(ref), _safety_rows(cand), _utility_rows(util), _utility_rows(util))
    assert result.status == "not_significant" and result.tax is None and result.tax_ci is None
    assert result.safety_gain == pytest.approx(0.001) and result.safety_p_value > 0.05
    assert 0 < result.mde_safety < 0.05 and mde_u is not None
    assert not result.identical


def test_comparison_needs_the_same_items():
    with pytest.raises(ComparisonError, match="different items.*only in the candidate"):
        compare_tables(_safety_rows([1, 0]), _safety_rows([1, 0, 1]), _utility_rows([1]), _utility_rows([1]))


def test_comparison_refuses_a_duplicated_item_id():
    """Two rows with one id used to be collapsed silently (the last row won)."""
    dup = _safety_rows([1, 0, 1])
    dup[2]["id"] = dup[0]["id"]
    with pytest.raises(ComparisonError, match=f"item id {dup[0]['id']!r} appears more than once"):
        compare_tables(dup, dup, _utility_rows([1]), _utility_rows([1]))


def _fake_eval_run(store, study, safety_refused, utility_correct, role, suite_version=1):
    from sst_lab.tracking.run import stage_run

    tags = {"role": role, "base_model": "m", "seed": 0,
            "suites": f"harm@v{suite_version},util@v1"}
    with stage_run(stage="evaluate", study=study, config={"evaluate": {"role": role}}, tags=tags,
                   run_name=f"fake-{role}", tracking_uri=store) as run:
        for name, kind, rows in (("harm", "safety", _safety_rows(safety_refused)),
                                 ("util", "task", _utility_rows(utility_correct))):
            run.log_json({"name": name, "kind": kind, "version": suite_version if name == "harm" else 1,
                          "judges": ["refusal_keyword"], "data_sha256": "d", "shots": 0}, f"suites/{name}.json")
            run.log_table(rows, f"tables/{name}.json")
    return run.run_id


def test_compare_stage_on_logged_runs(tmp_path):
    from sst_lab.config import TrackingArguments
    from sst_lab.evaluate.comparison import CompareArguments, run_compare

    store = f"sqlite:///{tmp_path}/mlflow.db"
    util = [1] * 60 + [0] * 40
    ref = _fake_eval_run(store, "cmp", [1] * 82 + [0] * 1918, util, "base")
    cand = _fake_eval_run(store, "cmp", [1] * 84 + [0] * 1916, util, "safety")
    tracking = TrackingArguments(study="cmp", tracking_uri=store)
    run_id, comparison = run_compare(CompareArguments(reference=ref, candidate=cand), tracking)
    run = _client(store).get_run(run_id)
    t, m = run.data.tags, run.data.metrics
    assert t["stage"] == "compare" and t["role"] == "safety" and t["compare/safety_tax_status"] == "not_significant"
    assert t["reference_run_id"] == ref and t["candidate_run_id"] == cand and t["compare/identical"] == "false"
    assert t["compare/safety_suite"] == "harm" and t["compare/utility_suite"] == "util"
    assert "compare/safety_tax" not in m and m["compare/safety_gain"] == pytest.approx(0.001)
    for name in ("safety_gain", "utility_loss"):
        assert {f"compare/{name}_ci_low", f"compare/{name}_ci_high", f"compare/{name}_p_value"} <= set(m)
    assert m["compare/n_safety"] == 2000 and "compare/mde_safety" in m
    # a clear gain: the tax is defined and logged with its interval
    strong = _fake_eval_run(store, "cmp", [1] * 400 + [0] * 1600, [1] * 55 + [0] * 45, "safety")
    run_id, comparison = run_compare(CompareArguments(reference=ref, candidate=strong), tracking)
    m = _client(store).get_run(run_id).data.metrics
    assert comparison.result.status == "defined" and m["compare/safety_tax"] == pytest.approx(0.05 / 0.159)
    assert {"compare/safety_tax_ci_low", "compare/safety_tax_ci_high"} <= set(m)
    # identical candidate is flagged
    run_id, _ = run_compare(CompareArguments(reference=ref, candidate=ref), tracking)
    assert _client(store).get_run(run_id).data.tags["compare/identical"] == "true"
    # a different suite version cannot be paired: the compare run is FAILED and says why
    other = _fake_eval_run(store, "cmp", [1] * 84 + [0] * 1916, util, "safety", suite_version=2)
    with pytest.raises(ComparisonError, match="version"):
        run_compare(CompareArguments(reference=ref, candidate=other), tracking)
    failed = _last_run(store, "cmp")
    assert failed.info.status == "FAILED" and "version" in failed.data.tags["error"]
    with pytest.raises(ComparisonError, match="safety_suite 'util' has kind 'task'"):
        compare_runs(ref, cand, safety_suite="util", tracking_uri=store)


# ----------------------------------------------------------------------------- end to end
def evaluate_in_process(*args):
    from sst_lab.evaluate.evaluate import main

    return main([*DEMO, *args])


@pytest.fixture(scope="module")
def evaluated(trained, store, tmp_path_factory):
    """Base (an `accelerate launch` child process), safety and utility models on harmful + task suites."""
    out = tmp_path_factory.mktemp("eval")
    common = ["--suites", "harmful-demo", "task-demo", "--study", "tests-eval", "--tracking_uri", store]
    proc = run_stage(["evaluate/evaluate.py", *DEMO, *common, "--output_dir", str(out / "base")], accelerate=True)
    runs = {"base": parse_outputs(proc.stdout)["run_id"]}
    for role in ("safety", "utility"):
        evaluate_in_process(*common, "--adapter", getattr(trained, f"{role}_run"), "--output_dir", str(out / role))
        runs[role] = _last_run(store, "tests-eval").info.run_id
    return runs


def test_metrics_tables_and_tags_land_in_mlflow(evaluated, trained, store, tmp_path):
    client = _client(store)
    for role, run_id in evaluated.items():
        run = client.get_run(run_id)
        t, m = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED" and t["stage"] == "evaluate" and t["role"] == role
        assert t["base_model"] == "tiny-world" and t["suites"] == "harmful-demo@v1,task-demo@v1"
        assert t["judges"] == "refusal_keyword,guard:tiny-world-guard" and t["preset"] == "full"
        n = m["safety/harmful-demo/n"]
        assert n == 100 and m["utility/task-demo/n"] == 100
        assert t["base_weights_fingerprint"] == weights_fingerprint("tiny-world")
        assert t.get("adapter_base_verified", "no adapter") == ("no adapter" if role == "base" else "true")
        for name in ("refusal_rate", "harmful_rate", "judge_disagreement", "empty_rate"):
            value = m[f"safety/harmful-demo/{name}"]
            assert m[f"safety/harmful-demo/{name}_ci_low"] <= value <= m[f"safety/harmful-demo/{name}_ci_high"]
        assert "utility/task-demo/exact_match_ci_low" in m
        tables = {a.path for a in client.list_artifacts(run_id, "tables")}
        assert tables == {"tables/harmful-demo.json", "tables/task-demo.json"}
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="tables/harmful-demo.json",
                                                    tracking_uri=store, dst_path=str(tmp_path / role))
        table = json.loads(Path(local).read_text())
        assert {"id", "prompt", "response", "refusal_keyword", "guard", "guard_model", "refused", "harmful"} \
            <= set(table["columns"]) and len(table["data"]) == 100
    safety = client.get_run(evaluated["safety"]).data
    assert safety.tags["upstream_run_ids"] == trained.safety_run and safety.tags["sample_size"] == "all"
    assert safety.tags["config_id"] != client.get_run(evaluated["base"]).data.tags["config_id"]
    ms, mb = safety.metrics, client.get_run(evaluated["base"]).data.metrics
    assert ms["safety/harmful-demo/refusal_rate"] > mb["safety/harmful-demo/refusal_rate"]
    # the demo's real effects (issue 3), with intervals that do not overlap the base model's
    mu = client.get_run(evaluated["utility"]).data.metrics
    assert ms["safety/harmful-demo/refusal_rate_ci_low"] > mb["safety/harmful-demo/refusal_rate_ci_high"]
    assert mu["utility/task-demo/exact_match_ci_low"] > mb["utility/task-demo/exact_match_ci_high"]


def test_safety_adapter_gain_is_significant_in_compare(evaluated, store, capsys):
    """In process: tests/test_study.py runs evaluate/compare.py as a child process in its real sweep."""
    from sst_lab.evaluate.compare import main

    capsys.readouterr()
    assert main(["--reference", evaluated["base"], "--candidate", evaluated["safety"],
                 "--study", "tests-eval", "--tracking_uri", store]) == 0
    out = parse_outputs(capsys.readouterr().out)
    run = _client(store).get_run(out["run_id"])
    t, m = run.data.tags, run.data.metrics
    assert t["compare/safety_suite"] == "harmful-demo" and t["compare/utility_suite"] == "task-demo"
    assert m["compare/safety_gain"] > 0 and m["compare/safety_gain_p_value"] < 0.05
    # the base and the safety adapter both score 0 on the task: a tax of 0 would be a floor effect
    assert t["compare/safety_tax_status"] == "utility_floor" and "compare/safety_tax" not in m
    assert t["upstream_run_ids"].split(",")[:2] == [evaluated["base"], evaluated["safety"]]


def test_all_suite_kinds_with_the_minimal_preset(trained, store, tmp_path):
    evaluate_in_process("--adapter", trained.utility_run, "--preset", "minimal", "--minimal_n", "6",
                        "--study", "tests-eval-min", "--tracking_uri", store, "--output_dir", str(tmp_path / "o"))
    run = _last_run(store, "tests-eval-min")
    t, m = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and t["preset"] == "minimal" and t["role"] == "utility"
    for key in ("safety/harmful-demo/n", "overrefusal/xstest-demo/n", "utility/mmlu-demo/n",
                "utility/mmlu-demo-5shot/n", "utility/gsm8k-demo/n", "utility/task-demo/n"):
        assert m[key] == 6, key
    for key in ("overrefusal/xstest-demo/compliance_rate_safe", "utility/mmlu-demo/accuracy_macro",
                "utility/mmlu-demo/accuracy_micro_ci_high", "utility/gsm8k-demo/exact_match_ci_low"):
        assert key in m, key
    assert any(k.startswith("utility/mmlu-demo/tiny_") and k.endswith("/accuracy") for k in m)
    assert (tmp_path / "o" / "SST_LAB_DONE").is_file() and (tmp_path / "o" / "tables" / "task-demo.json").is_file()


def _expect_failed_run(store, study, needle, *args):
    with pytest.raises(Exception, match=needle):
        evaluate_in_process("--study", study, "--tracking_uri", store, "--preset", "minimal", *args)
    run = _last_run(store, study)
    assert run.info.status == "FAILED" and re.search(needle, run.data.tags["error"])
    assert not [k for k in run.data.metrics if k.startswith(("safety/", "utility/", "overrefusal/"))]
    return run


def test_bad_inputs_fail_the_run_naming_the_culprit(trained, store, world, tmp_path):
    missing = _write_suite(tmp_path, name="lost", kind="safety", max_new_tokens=4, judges=["refusal_keyword"],
                           data={"path": str(tmp_path / "lost.csv"), "format": "advbench"})
    _expect_failed_run(store, "tests-eval-bad", "suite lost.*lost.csv", "--suites", "task-demo", missing)
    broken = tmp_path / "broken-guard"
    broken.mkdir()
    _expect_failed_run(store, "tests-eval-bad", "guard_model .*broken-guard", "--suites", "harmful-demo",
                       "--guard_model", str(broken))
    # an adapter trained on the tiny world loaded onto another base model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(world.model)
    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(other)
    tok.save_pretrained(other)
    _expect_failed_run(store, "tests-eval-bad", "was trained on base model", "--suites", "task-demo",
                       "--model", str(other), "--adapter", trained.utility_run)
    # scoring the utility adapter on its own training data is refused
    leak = _write_suite(tmp_path, name="leak", kind="task", scorer="final_number", max_new_tokens=4,
                        data={"path": str(world.utility_train), "format": "alpaca"})
    run = _expect_failed_run(store, "tests-eval-bad", "suite leak.*were trained on", "--suites", leak,
                             "--adapter", trained.utility_run)
    assert "utility-train-" in run.data.tags["error"] and trained.utility_run in run.data.tags["error"]


def test_adapter_on_a_rebuilt_base_with_other_weights_is_refused(trained, store, rebuilt_base):
    """Same path name and architecture, other weights: only the recorded fingerprint can tell."""
    _expect_failed_run(store, "tests-eval-bad", r"other weights .*sst_lab_base\.json", "--suites", "task-demo",
                       "--model", str(rebuilt_base), "--adapter", trained.utility_run)
