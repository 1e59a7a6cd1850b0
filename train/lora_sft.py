"""Library code of the train stage: LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from sst_lab.config import ConfigError
from sst_lab.data import load_training_records, sample, training_items
from sst_lab.io import atomic_dir, write_json_atomic
from sst_lab.models import (ALL_PROJECTIONS, check_target_modules, require_cuda_for_quantization, resolve_model_path,
                            write_base_record)
from sst_lab.redact import redact_text, redact_when_pickled
from sst_lab.held_out import HELD_OUT_FILE, check_refs, exclude_held_out

ROLES = ("utility", "safety", "other")


@dataclass
class TrainArguments:
    """What to train on (the data), and as which role."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "Local .jsonl/.json/.csv/.parquet/.tsv file or folder, 'data:<path>' (under $SST_LAB_DATA_ROOT), 'tiny-world:<file>', or a hub data set name."})
    dataset_format: str = field(default="auto", metadata={
        "help": "auto | messages | alpaca | prompt_completion."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub data set config name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (hub data sets)."})
    sample_size: int | None = field(default=None, metadata={
        "help": "Train on a deterministic subset of this many items drawn with the seed (default: all)."})
    role: str = field(default="utility", metadata={"help": "utility | safety | other (tag and run name)."})
    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ("exclude_items_of",)  # sst_lab.config.to_dict
    exclude_items_of: list[str] | None = field(default=None, metadata={
        "help": "Evaluation suite splits '<suite name or YAML path>:<validation|test>' whose items (by id or "
                "prompt_sha) are removed from the rows before the sample is drawn (e.g. sst2-heldout:validation)."})

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.exclude_items_of is not None:
            check_refs(self.exclude_items_of, "exclude_items_of")
        if self.sample_size is not None and self.sample_size <= 0:
            raise ConfigError(f"sample_size must be a positive integer, got {self.sample_size}")


def resolve_dataset_name(name: str | None) -> str:
    """``data:<path>`` and ``tiny-world:<file>`` -> the file (see sst_lab.data.resolve_data_ref)."""
    if not name:
        raise ConfigError("dataset_name is required (a local file/folder, data:<path>, tiny-world:<file>, "
                          "or a hub name)")
    from sst_lab.data import resolve_data_ref

    return resolve_data_ref(name)


def validate(args: TrainArguments, training_args: Any, model_args: Any) -> None:
    """Checks that must fail before a run spends time training."""
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is required")
    if "mlflow" in (training_args.report_to or []):
        raise ConfigError("report_to: mlflow would open a second run; sst-lab tracks the train stage itself "
                          "(remove mlflow from report_to)")
    require_cuda_for_quantization(model_args.load_in_4bit, model_args.load_in_8bit)
    if model_args.lora_target_modules is None:
        model_args.lora_target_modules = list(ALL_PROJECTIONS)
    check_target_modules(resolve_model_path(model_args.model_name_or_path), model_args.lora_target_modules)


def _RedactingSFTTrainer(base: type) -> type:  # noqa: N802 - a class factory (trl is imported lazily)
    class RedactingSFTTrainer(base):
        """SFTTrainer whose model card (README.md beside every checkpoint) names no secret: TRL takes the
        model name from ``hub_model_id``, which may be a URI with a password or a token."""

        def create_model_card(self, model_name=None, dataset_name=None, tags=None):
            return super().create_model_card(model_name=model_name and redact_text(model_name),
                                             dataset_name=dataset_name and redact_text(dataset_name), tags=tags)

    return RedactingSFTTrainer


@dataclass
class TrainResult:
    adapter_dir: Path
    n_items: int
    metrics: dict[str, float]


def train_adapter(args: TrainArguments, training_args: Any, model_args: Any, run: Any,
                  resolved_config: dict[str, Any]) -> TrainResult:
    """Load data, train a LoRA adapter with SFTTrainer, save it atomically, log it to ``run``."""
    import torch
    from datasets import Dataset
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from sst_lab.tracking.callbacks import StageMetricsCallback

    source = resolve_dataset_name(args.dataset_name)
    records = load_training_records(source, fmt=args.dataset_format, split=args.dataset_train_split,
                                    config=args.dataset_config, sample_size=None)
    held_out = None
    if args.exclude_items_of:  # before the sample is drawn: the seed then draws from the rest
        records, held_out = exclude_held_out(records, args.exclude_items_of, source)
    records = sample(records, args.sample_size, training_args.seed, source)
    run.log_dataset(records, name=redact_text(Path(args.dataset_name).name), source=redact_text(source), context="train")

    final = Path(training_args.output_dir) / "adapter"
    if final.exists():
        raise FileExistsError(f"output_dir {training_args.output_dir} already holds an adapter; "
                              "sst-lab never overwrites outputs: choose another output_dir")
    model_path = resolve_model_path(model_args.model_name_or_path)
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    redact_when_pickled(training_args)  # training_args.bin (every checkpoint, the adapter) holds no secret
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    trainer = _RedactingSFTTrainer(SFTTrainer)(model=model_path, args=training_args, train_dataset=dataset,
                         peft_config=get_peft_config(model_args), quantization_config=get_quantization_config(model_args),
                         callbacks=[StageMetricsCallback(run)])
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    elapsed = time.perf_counter() - t0

    staging = Path(training_args.output_dir) / ".adapter.staging"
    trainer.save_model(str(staging))  # every rank calls it (FSDP gathers); rank 0 writes
    trainer.accelerator.wait_for_everyone()
    metrics = {"train/n_items": float(len(records))}  # the trainer's own summary arrives via the callback
    if held_out is not None:
        metrics["train/n_candidates"] = float(held_out["n_candidates"])
        metrics["train/n_excluded_held_out"] = float(held_out["n_excluded"])
    metrics["train/wall_seconds"] = elapsed
    if torch.cuda.is_available():
        metrics["train/peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if run.enabled:
        with atomic_dir(final) as tmp:
            for f in staging.iterdir():
                f.replace(tmp / f.name)
            staging.rmdir()
            write_json_atomic(tmp / "training_items.json", training_items(records))
            if held_out is not None:
                write_json_atomic(tmp / HELD_OUT_FILE, held_out)
            base = write_base_record(tmp, model_args.model_name_or_path, model_args.model_revision)
            (tmp / "resolved_config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        run.log_metrics(metrics)
        run.log_artifacts(final, "adapter")
        run.set_tags({"adapter_path": str(final.resolve()), "base_weights_fingerprint": base["weights_fingerprint"]})
        if held_out is not None:
            run.set_tags({"train.exclude_items_of": ",".join(args.exclude_items_of),
                          "train.n_excluded_held_out": held_out["n_excluded"]})
    return TrainResult(adapter_dir=final, n_items=len(records), metrics=metrics)
