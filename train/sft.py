"""Train stage: LoRA / QLoRA supervised fine-tuning with TRL, tracked in MLflow.

    accelerate launch train/sft.py --config configs/models/tiny.yaml --config configs/train/safety.yaml
    python train/sft.py --config ... --sample_size 200 --seed 1 --study my-study

Prints the run id and the adapter path at the end.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def make_parser_types():
    from trl import ModelConfig, SFTConfig

    from sst_lab.config import TrackingArguments
    from sst_lab.train.lora_sft import TrainArguments

    return (TrainArguments, SFTConfig, ModelConfig, TrackingArguments)


def main(argv=None) -> int:
    from sst_lab.config import parse_stage_args, to_dict
    from sst_lab.redact import redact
    from sst_lab.tracking.run import stage_run
    from sst_lab.train.lora_sft import train_adapter, validate

    args, training_args, model_args, tracking = parse_stage_args(make_parser_types(), argv)
    validate(args, training_args, model_args)
    model = model_args.model_name_or_path
    size = args.sample_size if args.sample_size is not None else "all"
    run_name = training_args.run_name or f"train-{args.role}-{Path(model).name}-n{size}-s{training_args.seed}"
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = str(Path("outputs") / tracking.study / run_name)
    config = redact({"train": to_dict(args), "sft": to_dict(training_args), "model": to_dict(model_args),
                     "tracking": to_dict(tracking)})
    tags = {"base_model": model, "role": args.role, "sample_size": size, "seed": training_args.seed}
    with stage_run(stage="train", study=tracking.study, config=config, tags=tags, run_name=run_name,
                   tracking_uri=tracking.tracking_uri, metrics_flush_seconds=tracking.metrics_flush_seconds) as run:
        result = train_adapter(args, training_args, model_args, run, config)
    if run.enabled:
        print(f"run_id: {run.run_id}\nadapter: {result.adapter_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
