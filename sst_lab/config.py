"""One config mechanism for every stage: typed dataclasses, YAML defaults, CLI overrides, strict.

``parse_stage_args(types, argv)`` wraps TRL's ``TrlParser``:

* ``--config FILE`` may be given several times; files are merged in order (a later file's keys
  override an earlier one's), so a model preset and a role config compose:
  ``--config configs/models/tiny.yaml --config configs/train/safety.yaml``;
* command-line ``--key value`` pairs override the YAML;
* an unknown key in a YAML file or on the command line is an error (TRL's own scripts turn this
  off; we do not).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or field is wrong; the message names the file and the field."""


@dataclass
class TrackingArguments:
    """Where and under which name a stage records itself (the *how*, not the *what*)."""

    study: str = field(default="default", metadata={"help": "MLflow experiment name (one per study)."})
    tracking_uri: str | None = field(
        default=None,
        metadata={"help": "MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db."})
    metrics_flush_seconds: float = field(
        default=10.0,
        metadata={"help": "Training-curve points are written to the store in one batch this often (and when the "
                          "run closes); a write at every step cost 12-18 %% of the tiny world's throughput."})


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a YAML mapping, got {type(data).__name__}")
    return data


def merge_config_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in paths:
        merged.update(read_yaml(path))
    return merged


def _split_configs(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    configs, rest, it = [], [], iter(argv)
    for arg in it:
        if arg == "--config":
            try:
                configs.append(next(it))
            except StopIteration:
                raise ConfigError("--config needs a file path") from None
        elif arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return configs, rest


def parse_stage_args(types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse dataclasses from ``--config`` YAML files and CLI overrides; unknown keys are errors."""
    import sys

    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    configs, rest = _split_configs(argv)
    parser = TrlParser(list(types))
    if not configs:
        return tuple(parser.parse_args_and_config(rest))
    _check_keys(configs, types)
    merged = merge_config_files(configs)
    fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix="sst-lab-config-")
    try:
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(merged, fh)
        try:
            return tuple(parser.parse_args_and_config(["--config", tmp, *rest]))
        except ValueError as exc:
            if "Unknown arguments from config file" in str(exc):
                raise ConfigError(f"{', '.join(map(str, configs))}: {exc}") from None
            raise
    finally:
        os.unlink(tmp)


def _check_keys(configs: Sequence[str | Path], types: Sequence[type]) -> None:
    """An unknown key is reported with the one config file that holds it (and a close known name)."""
    import difflib

    known = {f.name for t in types for f in dataclasses.fields(t)} | {"env"}  # TrlParser reads `env`
    for path in configs:
        unknown = sorted(set(read_yaml(path)) - known)
        if unknown:
            hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1))
                     else repr(k) for k in unknown]
            raise ConfigError(f"config file {path}: unknown key(s) {', '.join(hints)}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass (or TrainingArguments) as a plain dict of its fields. Fields a dataclass names in its
    class attribute ``OMIT_WHEN_NONE`` (fields added after runs were logged) are left out while they
    are None, so the config ids of those runs (hashes of this dict) stay what they were."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    out = dataclasses.asdict(obj)
    for name in getattr(type(obj), "OMIT_WHEN_NONE", ()):
        if out[name] is None:
            del out[name]
    return out
