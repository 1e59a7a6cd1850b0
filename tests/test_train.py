"""train/sft.py end to end on the tiny world, and its failure modes, read back from MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from conftest import REPO, run_stage
from sst_lab.models import weights_fingerprint


def _run(store, run_id):
    return mlflow.MlflowClient(tracking_uri=store).get_run(run_id)


@pytest.mark.parametrize("role", ["utility", "safety"])
def test_train_run_is_recorded_completely(trained, store, world, role, tmp_path):
    run = _run(store, getattr(trained, f"{role}_run"))
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["stage"] == "train" and tags["role"] == role and tags["base_model"] == "tiny-world"
    assert tags["seed"] == "1" and tags["sample_size"] == "all" and len(tags["config_id"]) == 16
    assert tags["version.trl"] and tags["git_commit"]
    params = run.data.params
    assert params["train.role"] == role and params["model.lora_r"] == "8" and params["sft.seed"] == "1"
    metrics = run.data.metrics
    assert metrics["train/n_items"] > 100
    for name in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        assert name in metrics, name
    history = mlflow.MlflowClient(tracking_uri=store).get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 2 and history[-1].value < history[0].value  # it learnt something
    # dataset input with digest and row count
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest and inputs[0].tags[0].value == "train"
    # artifacts: adapter loads with PeftModel, training ids recorded
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter",
                                                     tracking_uri=store, dst_path=str(tmp_path)))
    items = json.loads((local / "training_items.json").read_text())
    assert len(items) == metrics["train/n_items"] and {"id", "prompt_sha"} <= set(items[0])
    assert (local / "resolved_config.yaml").is_file()
    base = json.loads((local / "sst_lab_base.json").read_text())
    assert base["weights_fingerprint"] == tags["base_weights_fingerprint"] == weights_fingerprint("tiny-world")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world.model)
    model = PeftModel.from_pretrained(base, local)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
    assert f"run_id: {run.info.run_id}" in trained.stdout


def test_sample_size_draws_a_seeded_subset(world, store, tmp_path, capsys):
    """In process (the `trained` fixture runs the stage script end to end under `accelerate launch`)."""
    from sst_lab.train.sft import main

    def items(seed, name):
        capsys.readouterr()
        assert main(["--config", "configs/models/tiny.yaml", "--config", "configs/train/utility.yaml",
                     "--study", "tests-sample", "--tracking_uri", store, "--output_dir", str(tmp_path / name),
                     "--seed", str(seed), "--sample_size", "32", "--max_steps", "1"]) == 0
        adapter = Path(capsys.readouterr().out.split("adapter: ")[1].split()[0])
        return [i["id"] for i in json.loads((adapter / "training_items.json").read_text())]

    a, b = items(3, "a"), items(4, "b")
    assert len(a) == len(b) == 32 and a != b


def _bad(store, tmp_path, *extra, subprocess=False):
    """Run the stage with bad input; return the error text (stderr of a child, or the exception)."""
    argv = ["--config", "configs/models/tiny.yaml", "--study", "tests-bad", "--tracking_uri", store,
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *extra]
    if subprocess:
        proc = run_stage(["train/sft.py", *argv], check=False)
        assert proc.returncode != 0
        return proc.stderr
    from sst_lab.train.sft import main

    with pytest.raises(Exception) as info:
        main(argv)
    return str(info.value)


def _last_run(store, study):
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def test_malformed_dataset_fails_clearly_and_marks_run_failed(world, store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "hi"}) + "\n")
    err = _bad(store, tmp_path, "--dataset_name", str(bad), "--dataset_format", "alpaca", subprocess=True)
    assert "bad.jsonl" in err and "output" in err
    run = _last_run(store, "tests-bad")
    assert run.info.status == "FAILED" and "output" in run.data.tags["error"]


@pytest.mark.parametrize("extra, needle", [
    (["--dataset_name", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
    (["--dataset_name", "tiny-world:utility_train.jsonl", "--sample_size", "100000"], "sample_size 100000"),
    (["--dataset_name", "tiny-world:utility_train.jsonl", "--dataset_format", "sharegpt"], "sharegpt"),
    (["--dataset_name", "tiny-world:utility_train.jsonl", "--lora_target_modules", "c_attn"], "lora_target_modules"),
    (["--dataset_name", "tiny-world:utility_train.jsonl", "--load_in_4bit", "true"], "load_in_4bit"),
])
def test_bad_inputs_name_the_culprit(world, store, tmp_path, extra, needle):
    assert needle in _bad(store, tmp_path, *extra)


def test_empty_and_columnless_files(world, store, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in _bad(store, tmp_path, "--dataset_name", str(empty))
    odd = tmp_path / "odd.csv"
    odd.write_text("question,answer\nq,a\n")
    assert "cannot detect the data format" in _bad(store, tmp_path, "--dataset_name", str(odd))


def test_unknown_config_key_is_an_error(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("lerning_rate: 0.1\n")
    proc = run_stage(["train/sft.py", "--config", "configs/models/tiny.yaml", "--config", str(cfg)], check=False)
    assert proc.returncode != 0 and "lerning_rate" in proc.stderr


def test_help_is_quick_and_lists_own_fields():
    proc = run_stage(["train/sft.py", "--help"])
    assert "--sample_size" in proc.stdout and "--study" in proc.stdout
