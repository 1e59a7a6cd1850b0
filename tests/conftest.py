"""Shared, built-once fixtures: the tiny world, one MLflow store, and the two trained demo adapters."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def stage_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_stage(args: list[str], *, accelerate: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    """Run a stage script as users do, from the repo root, in a child process."""
    py = sys.executable
    if accelerate:
        cmd = [py, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml", *args]
    else:
        cmd = [py, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def parse_outputs(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        if ": " in line:
            key, value = line.split(": ", 1)
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="session")
def world():
    from sst_lab.tinyworld import build_tiny_world

    return build_tiny_world()


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlruns')}/mlflow.db"


@dataclass(frozen=True)
class Trained:
    utility_run: str
    safety_run: str
    utility_adapter: Path
    safety_adapter: Path
    stdout: str


@pytest.fixture(scope="session")
def trained(world, store, tmp_path_factory) -> Trained:
    """Both demo adapters, trained once per session with `accelerate launch train/sft.py`."""
    out = tmp_path_factory.mktemp("train")
    ids = {}
    logs = ""
    for role in ("utility", "safety"):
        proc = run_stage(["train/sft.py", "--config", "configs/models/tiny.yaml", "--config",
                          f"configs/train/{role}.yaml", "--study", "tests", "--tracking_uri", store,
                          "--output_dir", str(out / role), "--seed", "1"], accelerate=True)
        ids[role] = parse_outputs(proc.stdout)
        logs += proc.stdout
    return Trained(utility_run=ids["utility"]["run_id"], safety_run=ids["safety"]["run_id"],
                   utility_adapter=Path(ids["utility"]["adapter"]), safety_adapter=Path(ids["safety"]["adapter"]),
                   stdout=logs)


@pytest.fixture(scope="session")
def rebuilt_base(world, tmp_path_factory) -> Path:
    """The tiny world's base model as a rebuild would leave it: same folder name, same architecture
    and tokenizer, slightly different weights (an adapter trained on the original must not load)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("rebuilt") / Path(world.model).name
    shutil.copytree(world.model, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder
