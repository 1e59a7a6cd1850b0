"""No planted secret reaches the store, an artifact, an output folder or the console.

A token and a password are planted in every input channel of the train stage (command-line
arguments, a config file, the environment, URIs) of one run that trains (one step, one checkpoint)
and one that fails on a `postgresql://user:password@...` data set; then every byte the runs could
write is searched for them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import REPO, stage_env
from sst_lab.redact import REDACTED, is_secret_key, redact, redact_text

TOKEN = "hf_PlantedLeakTestToken0123456789abcd"
PASSWORD = "Pl4nted-Passw0rd-q7"
NEEDLES = (TOKEN, PASSWORD)


def _leaks(data: bytes | str) -> list[str]:
    blob = data.encode() if isinstance(data, str) else data
    return [n for n in NEEDLES if n.encode() in blob]


def _files_with_secrets(*roots: Path) -> dict[str, list[str]]:
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            hits = _leaks(str(path))
            if path.is_file():
                hits += _leaks(path.read_bytes())
            if hits:
                found[str(path)] = hits
    return found


def test_planted_secrets_never_leak(world, store, tmp_path, monkeypatch, capfd):
    from sst_lab.train.sft import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    extra = tmp_path / "secrets.yaml"  # the config-file channel: a password in a nested secret key
    extra.write_text(f"model_init_kwargs:\n  token: {PASSWORD}\n")
    out = tmp_path / "outputs"
    common = ["--config", "configs/models/tiny.yaml", "--config", str(extra), "--study", "tests-secrets",
              "--tracking_uri", store, "--hub_token", TOKEN, "--max_steps", "1",
              "--hub_model_id", f"https://trainer:{PASSWORD}@hub.example.org/org/x?access_token={TOKEN}"]
    # one step, one checkpoint: training_args.bin lands in checkpoint-1/ and in the adapter
    assert main([*common, "--config", "configs/train/safety.yaml", "--sample_size", "16",
                 "--output_dir", str(out / "ok"), "--save_strategy", "steps", "--save_steps", "1"]) == 0
    ok = capfd.readouterr()
    adapter = out / "ok" / "adapter"
    assert (adapter / "training_args.bin").is_file() and (out / "ok" / "checkpoint-1" / "training_args.bin").is_file()
    saved = torch.load(adapter / "training_args.bin", weights_only=False)
    assert type(saved).__name__ == "SFTConfig" and saved.hub_token == REDACTED
    assert saved.model_init_kwargs["token"] == REDACTED and saved.learning_rate == 0.002  # the rest intact

    # a data set URI with a password (the datasets library rewrites it to postgresql:/u:pw@...)
    with pytest.raises(Exception, match="postgresql:"):
        main([*common, "--output_dir", str(out / "bad"), "--dataset_name",
              f"postgresql://u:{PASSWORD}@db.example.org:5432/x"])
    bad = capfd.readouterr()
    assert "[sst-lab] run FAILED" in bad.err and "postgresql:" in bad.err
    # the traceback a stage process prints when its error escapes (a child: the interpreter prints it)
    code = ("import sys; from sst_lab.tracking.run import stage_run\n"
            f"with stage_run(stage='merge', study='tests-secrets', config={{}}, tags={{'role': 'merged'}}, "
            f"run_name='m', tracking_uri={store!r}):\n"
            f"    print('connecting to postgresql:/u:{PASSWORD}@db', file=sys.stderr)\n"
            f"    raise ValueError('no such data set postgresql:/u:{PASSWORD}@db?token={TOKEN}')\n")
    failed = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=stage_env(), capture_output=True, text=True)
    assert failed.returncode != 0 and "Traceback" in failed.stderr and "connecting to postgresql:" in failed.stderr

    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("tests-secrets")
    every = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    runs = {}
    for run in every:
        runs.setdefault(run.info.status, run)  # FAILED: the train run with the postgresql data set
    assert len(every) == 3 and set(runs) == {"FINISHED", "FAILED"}
    assert "postgresql:" in runs["FAILED"].data.tags["error"] and REDACTED in runs["FAILED"].data.tags["error"]
    error_txt = Path(client.download_artifacts(runs["FAILED"].info.run_id, "error.txt", str(tmp_path / "dl")))
    assert "postgresql:" in error_txt.read_text()
    params = runs["FINISHED"].data.params
    assert params["sft.hub_token"] == REDACTED and params["sft.model_init_kwargs.token"] == REDACTED
    assert params["sft.average_tokens_across_devices"] == "true"  # harmless names are not masked
    assert params["sft.include_num_input_tokens_seen"] != REDACTED
    for run in every:
        assert not _leaks(json.dumps([run.data.params, run.data.tags, run.info.run_name]))
        for ds in run.inputs.dataset_inputs:
            assert not _leaks(ds.dataset.source + ds.dataset.name)

    store_dir = Path(store[len("sqlite:///"):]).parent  # the sqlite file and every artifact
    assert _files_with_secrets(store_dir, out) == {}
    assert not _leaks(ok.out + ok.err + bad.out + bad.err + failed.stdout + failed.stderr)


@pytest.mark.parametrize("text", [
    f"postgresql://u:{PASSWORD}@db:5432/x", f"postgresql:/u:{PASSWORD}@db:5432/x",  # datasets rewrites ://
    f"FileNotFoundError: u:{PASSWORD}@db.example.org", f"https://h/x?page=2&token={PASSWORD}&sig={PASSWORD}",
    f"prefix{TOKEN}", f"{{'hub_token': '{PASSWORD}'}}", f"python train/sft.py --hub_token {PASSWORD} --seed 1",
    f"db_password: {PASSWORD}", f"AWS_SECRET_ACCESS_KEY={PASSWORD}",
])
def test_text_redaction_covers_every_form(text):
    assert not _leaks(redact_text(text)) and REDACTED in redact_text(text)


def test_only_secret_names_are_masked():
    assert not any(is_secret_key(k) for k in ("sft.average_tokens_across_devices", "sft.include_num_input_tokens_seen",
                                              "max_new_tokens", "pad_token", "TOKENIZERS_PARALLELISM", "author",
                                              "mean_token_accuracy", "train/mean_token_accuracy", "token_id"))
    # TRL's training log line: its token accuracy used to be printed as REDACTED
    line = "{'loss': '0.2016', 'mean_token_accuracy': '0.8125', 'num_tokens': '4433'}"
    assert redact_text(line) == line
    assert all(is_secret_key(k) for k in ("hub_token", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "apiKey", "api_key",
                                          "db.password", "private_key", "use_auth_token", "token",
                                          "hub_token_value", "GITHUB_TOKEN"))
    value = "zq-remembered-9"
    assert redact({"x": {"token": value}}) == {"x": {"token": REDACTED}}
    assert redact_text(f"later, in a message: {value}") == f"later, in a message: {REDACTED}"


@pytest.mark.parametrize("text", [
    "classifier:tiny-world-guard@6c4998283c30+template@706f0e7a41b2",  # judge ids (evaluate/calibrate tags)
    "guard:tiny-world-guard@6c4998283c30", "refusal_keyword@0123abcd",
])
def test_ids_shaped_like_user_at_host_are_kept(text):
    """A bare ``name:value@x`` is a credential only when x looks like a host (dotted, localhost, [ipv6])."""
    assert redact_text(text) == text


def test_the_working_directory_is_not_a_secret(monkeypatch, tmp_path):
    """``$PWD`` ends in the word "pwd": masking its value hid the repo path in every log line."""
    monkeypatch.setenv("PWD", str(tmp_path / "checkout-dir"))
    monkeypatch.setenv("DB_PWD", "s3cr3t-value")
    text = f"{tmp_path}/checkout-dir/.venv/bin/python train/sft.py --x s3cr3t-value"
    assert redact_text(text) == f"{tmp_path}/checkout-dir/.venv/bin/python train/sft.py --x {REDACTED}"
