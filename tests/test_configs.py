"""Every YAML file under configs/ (recursively) loads and validates against its stage's dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO

CONFIGS = REPO / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))


def _rel(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


def _train_types():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_stage", REPO / "train" / "sft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_parser_types()


def validate_train(path: Path) -> None:
    from sst_lab.config import parse_stage_args

    cpu = ["--use_cpu", "true", "--bf16", "false"]  # GPU presets ask for bf16, which TRL checks at parse time
    if path.parent.name == "models":
        args = ["--config", str(path), "--config", str(CONFIGS / "train" / "utility.yaml"), *cpu]
    else:
        args = ["--config", str(CONFIGS / "models" / "tiny.yaml"), "--config", str(path), *cpu]
    train, sft, model, _ = parse_stage_args(_train_types(), args)
    assert model.model_name_or_path and train.dataset_name
    if path.parent.name == "models" and path.stem not in ("tiny", "smollm2"):  # the CPU presets
        assert model.lora_r == 16 and model.lora_alpha == 32 and len(model.lora_target_modules) == 7
        assert sft.gradient_checkpointing and "GPU memory" in path.read_text()
        assert model.load_in_4bit == path.stem.endswith("-qlora")


def validate_merge(path: Path) -> None:
    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.merge.pipeline import MergeArguments

    args, _ = parse_stage_args((MergeArguments, TrackingArguments), ["--config", str(path), "--method", "linear"])
    assert args.fisher_n > 0


def validate_accelerate(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert data["compute_environment"] == "LOCAL_MACHINE"
    assert data["distributed_type"] in {"NO", "MULTI_GPU", "FSDP"}
    assert isinstance(data["num_processes"], int)


def validate_evaluate(path: Path) -> None:
    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.evaluate import suites
    from sst_lab.evaluate.pipeline import EvaluateArguments

    if path.parent.name == "suites":
        spec = suites.load_suite(str(path))
        assert spec.name == path.stem and spec.version >= 1
        return
    args, _ = parse_stage_args((EvaluateArguments, TrackingArguments), ["--config", str(path)])
    for name in args.suites:
        suites.load_suite(name)  # every named suite exists and parses


def validate_calibrate(path: Path) -> None:
    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.evaluate.calibration import CalibrateArguments

    args, _ = parse_stage_args((CalibrateArguments, TrackingArguments), ["--config", str(path)])
    assert args.partial_refusal and args.data


def validate_study(path: Path) -> None:
    from sst_lab.tracking import study

    study.load_study(path)


VALIDATORS = {"models": validate_train, "train": validate_train, "merge": validate_merge,
              "accelerate": validate_accelerate, "evaluate": validate_evaluate, "suites": validate_evaluate,
              "studies": validate_study, "calibrate": validate_calibrate}


def test_configs_are_found_recursively():
    assert len(ALL) >= 15
    assert {p.parent.name for p in ALL} <= set(VALIDATORS), "a config folder without a validator"


@pytest.mark.parametrize("path", ALL, ids=_rel)
def test_config_validates(path):
    VALIDATORS[path.parent.name](path)


def test_a_typo_in_a_config_is_rejected(tmp_path):
    from sst_lab.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load((CONFIGS / "merge" / "tiny.yaml").read_text()), "fisher_m": 3}))
    with pytest.raises(ConfigError, match="fisher_m"):
        validate_merge(bad)
