"""Issue 9: broken models never score safe, incomplete or corrupt adapters are refused naming the file
and tensor, and the smaller input checks (BOM, alpha, k, unwritable store, YAML typo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from sst_lab.adapters import AdapterFolderError, check_adapter_folder
from sst_lab.config import ConfigError

NAN_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _last_run(store, study):
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def _copy(adapter: Path, dst: Path) -> Path:
    shutil.copytree(adapter, dst)
    return dst


def _plant_nan(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[NAN_KEY][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})


def test_adapter_folder_checks_name_the_missing_or_corrupt_file(trained, tmp_path):
    good = _copy(trained.utility_adapter, tmp_path / "good")
    check_adapter_folder(good, where="adapter (x)")  # complete: accepted

    half = _copy(good, tmp_path / "half")
    (half / "SST_LAB_DONE").unlink()
    with pytest.raises(AdapterFolderError, match=r"adapter \(x\): no SST_LAB_DONE marker"):
        check_adapter_folder(half, where="adapter (x)")

    no_items = _copy(good, tmp_path / "no_items")
    (no_items / "training_items.json").unlink()
    with pytest.raises(AdapterFolderError, match="training_items.json is missing.*trained_elsewhere"):
        check_adapter_folder(no_items, where="adapter (x)")
    check_adapter_folder(no_items, where="adapter (x)", trained_elsewhere=True)  # the user's explicit word

    no_weights = _copy(good, tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFolderError, match="weights file adapter_model.safetensors is missing"):
        check_adapter_folder(no_weights, where="adapter (x)", trained_elsewhere=True)

    truncated = _copy(good, tmp_path / "truncated")
    w = truncated / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdapterFolderError, match=r"adapter_model.safetensors cannot be read \(truncated"):
        check_adapter_folder(truncated, where="adapter (x)")

    nan = _copy(good, tmp_path / "nan")
    _plant_nan(nan)
    with pytest.raises(AdapterFolderError, match=rf"non-finite values .*{NAN_KEY} \(1 NaN, 0 Inf"):
        check_adapter_folder(nan, where="adapter (x)")


def test_a_nan_safety_adapter_is_refused_by_merge_and_evaluate_naming_the_tensor(trained, store, tmp_path):
    from sst_lab.evaluate.evaluate import main as evaluate
    from sst_lab.merge.merge import main as merge

    nan = _copy(trained.safety_adapter, tmp_path / "nan-safety")
    _plant_nan(nan)
    with pytest.raises(AdapterFolderError, match=rf"safety_adapter \(.*nan-safety\).*{NAN_KEY}"):
        merge(["--config", "configs/merge/tiny.yaml", "--utility_adapter", trained.utility_run, "--safety_adapter",
               str(nan), "--method", "linear", "--study", "tests-broken", "--tracking_uri", store,
               "--output_dir", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()
    with pytest.raises(AdapterFolderError, match=NAN_KEY):
        evaluate(["--config", "configs/evaluate/tiny.yaml", "--adapter", str(nan), "--role", "safety", "--suites",
                  "task-demo", "--preset", "minimal", "--study", "tests-broken", "--tracking_uri", store])
    run = _last_run(store, "tests-broken")
    assert run.info.status == "FAILED" and NAN_KEY in run.data.tags["error"]
    assert not [k for k in run.data.metrics if k.startswith(("safety/", "utility/"))]


def test_evaluate_refuses_half_written_adapters_and_tags_trained_elsewhere(trained, store, tmp_path):
    from sst_lab.evaluate.evaluate import main as evaluate

    common = ["--config", "configs/evaluate/tiny.yaml", "--role", "utility", "--suites", "task-demo", "--preset",
              "minimal", "--minimal_n", "2", "--study", "tests-broken-half", "--tracking_uri", store]
    half = _copy(trained.utility_adapter, tmp_path / "half")
    (half / "SST_LAB_DONE").unlink()
    with pytest.raises(AdapterFolderError, match="no SST_LAB_DONE marker"):
        evaluate([*common, "--adapter", str(half)])
    assert _last_run(store, "tests-broken-half").info.status == "FAILED"
    (half / "training_items.json").unlink()
    evaluate([*common, "--adapter", str(half), "--trained_elsewhere", "true", "--output_dir", str(tmp_path / "o")])
    run = _last_run(store, "tests-broken-half")
    assert run.info.status == "FINISHED" and run.data.tags["adapter_trained_elsewhere"] == "true"


def test_merge_refuses_half_written_adapters_unless_trained_elsewhere(trained, store, tmp_path):
    from sst_lab.merge.merge import main as merge

    half = _copy(trained.safety_adapter, tmp_path / "half")
    (half / "SST_LAB_DONE").unlink()
    (half / "training_items.json").unlink()
    common = ["--config", "configs/merge/tiny.yaml", "--utility_adapter", trained.utility_run, "--safety_adapter",
              str(half), "--method", "linear", "--study", "tests-broken-merge", "--tracking_uri", store]
    with pytest.raises(AdapterFolderError, match=r"safety_adapter \(.*half\): no SST_LAB_DONE marker"):
        merge([*common, "--output_dir", str(tmp_path / "m1")])
    merge([*common, "--trained_elsewhere", "true", "--output_dir", str(tmp_path / "m2")])
    run = _last_run(store, "tests-broken-merge")
    assert run.info.status == "FINISHED" and run.data.tags["adapter_trained_elsewhere"] == "safety_adapter"


def test_the_engine_refuses_non_finite_weights(world):
    from sst_lab.evaluate.engine import EngineError, HFEngine

    engine = HFEngine.load("tiny-world", dtype="float32")
    engine.check_finite()  # the intact model passes
    with torch.no_grad():
        engine.model.model.norm.weight[0] = float("inf")
    with pytest.raises(EngineError, match=r"weight tensor\(s\) hold NaN/Inf, e.g. \['model.norm.weight'\]"):
        engine.check_finite()


@pytest.fixture(scope="module")
def silent_base(world, tmp_path_factory) -> Path:
    """A model with finite weights that says nothing: final norm zeroed, so every logit is 0 and greedy
    decoding emits <pad> (a special token, decoded as ""), as a NaN model does."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("silent") / "silent-model"
    shutil.copytree(world.model, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"].zero_()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_model_that_says_nothing_never_scores_safe(silent_base, store, tmp_path):
    """The issue's case: all responses empty read as refusal 0, harmful 0, and compare with the guard
    reported a safety gain of +1.00. Now the suite is marked invalid and compare refuses it."""
    from sst_lab.evaluate.comparison import ComparisonError, compare_runs
    from sst_lab.evaluate.evaluate import main as evaluate

    common = ["--config", "configs/evaluate/tiny.yaml", "--suites", "harmful-demo", "task-demo", "--preset",
              "minimal", "--minimal_n", "8", "--study", "tests-silent", "--tracking_uri", store]
    evaluate([*common, "--output_dir", str(tmp_path / "base")])
    base = _last_run(store, "tests-silent")
    evaluate([*common, "--model", str(silent_base), "--role", "other", "--output_dir", str(tmp_path / "silent")])
    silent = _last_run(store, "tests-silent")
    assert base.data.tags["invalid_suites"] == "none" and base.data.metrics["safety/harmful-demo/valid"] == 1.0
    m = silent.data.metrics
    assert silent.info.status == "FINISHED" and m["safety/harmful-demo/empty_rate"] == 1.0
    assert silent.data.tags["invalid_suites"] == "harmful-demo,task-demo"
    assert m["safety/harmful-demo/valid"] == 0.0 and m["utility/task-demo/valid"] == 0.0
    # no rate of an invalid suite reaches the store, so no aggregate can average a "harmful rate 0"
    assert not {"safety/harmful-demo/harmful_rate", "safety/harmful-demo/refusal_rate",
                "utility/task-demo/exact_match"} & set(m)
    omitted = json.loads((tmp_path / "silent" / "omitted_metrics.json").read_text())
    assert omitted["safety/harmful-demo/harmful_rate"].startswith("suite invalid: empty_rate 1.000")
    for judge in ("guard", "refusal_keyword"):
        with pytest.raises(ComparisonError, match=rf"run {silent.info.run_id}: suite harmful-demo is invalid "
                                                  r"\(8 of 8 responses are empty"):
            compare_runs(base.info.run_id, silent.info.run_id, safety_judge=judge, tracking_uri=store)


def test_an_empty_response_is_never_safe_under_either_judge():
    from sst_lab.evaluate.comparison import compare_tables
    from sst_lab.evaluate.judges import is_empty

    assert is_empty("") and is_empty("  \n") and is_empty("!!! ...") and not is_empty("No.")
    # the guard calls an empty reply harmless (harmful 0); it must still count as not safe
    ref = [{"id": f"h{i}", "refused": 0, "harmful": 1, "empty": 0} for i in range(12)]
    cand = [{"id": f"h{i}", "refused": 0, "harmful": 0, "empty": 1} for i in range(12)]
    util = [{"id": f"u{i}", "correct": 1} for i in range(12)]
    for judge in ("guard", "refusal_keyword"):
        result, _ = compare_tables(ref, cand, util, util, safety_judge=judge, n_boot=200)
        assert result.safety_gain == 0.0 and result.status != "defined"


# ------------------------------------------------------------------------------ the smaller points
def test_training_csv_with_a_bom_keeps_its_id_column(tmp_path):
    from sst_lab.data import load_rows

    path = tmp_path / "bom.csv"
    path.write_text("id,instruction,output\nx-1,Say hi,hi\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_rows(str(path)) == [{"id": "x-1", "instruction": "Say hi", "output": "hi"}]


def test_negative_alpha_and_oversized_k_are_refused_before_any_work(trained, store, tmp_path):
    from sst_lab.merge.merge import main as merge
    from sst_lab.merge.pipeline import MergeArguments

    with pytest.raises(ConfigError, match="alpha must be >= 0, got -1.0.*anti-safety"):
        MergeArguments(method="sst", k=4, alpha=-1.0)
    # r = 8 here: 64 core directions; refused by the plan, before the Fisher pass (no fisher_* metric)
    with pytest.raises(ConfigError, match=r"k = 65 exceeds the r² = 64 core directions of safety module"):
        merge(["--config", "configs/merge/tiny.yaml", "--utility_adapter", trained.utility_run, "--safety_adapter",
               trained.safety_run, "--method", "sst", "--k", "65", "--alpha", "1.0", "--study", "tests-broken-k",
               "--tracking_uri", store, "--output_dir", str(tmp_path / "m")])
    run = _last_run(store, "tests-broken-k")
    assert run.info.status == "FAILED" and not any(k.startswith("merge/fisher") for k in run.data.metrics)


def test_an_unwritable_store_ends_with_one_clear_line(tmp_path, capsys):
    from sst_lab.tracking.run import TrackingError, stage_run

    (tmp_path / "mlflow.db").mkdir()  # a folder where the sqlite file should be: sqlite cannot open it
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingError, match="cannot be written") as err:
        with stage_run(stage="compare", study="s", config={}, tags={"role": "x"}, run_name="r", tracking_uri=uri):
            pass
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no SQLAlchemy chain
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[sst-lab]")]
    assert len(lines) == 1 and uri in lines[0] and "unable to open database file" in lines[0]


def test_a_yaml_typo_names_the_one_file_that_holds_it(tmp_path):
    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.evaluate.pipeline import EvaluateArguments

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("model: tiny-world\nsuites: [task-demo]\n")
    bad.write_text("preset: minimal\nbatch_sise: 4\n")
    with pytest.raises(ConfigError) as err:
        parse_stage_args((EvaluateArguments, TrackingArguments), ["--config", str(good), "--config", str(bad)])
    assert str(bad) in str(err.value) and str(good) not in str(err.value)
    assert "'batch_sise' (did you mean 'batch_size'?)" in str(err.value)
