"""Evaluate stage: score a base, utility, safety or merged model on declared suites, tracked in MLflow.

    python evaluate/evaluate.py --config configs/evaluate/tiny.yaml                       # the base model
    python evaluate/evaluate.py --config configs/evaluate/tiny.yaml --adapter <train or merge run id>
    accelerate launch evaluate/evaluate.py --config configs/evaluate/gpu.yaml --adapter <run id>

Prints the run id and the local output folder at the end. Suites: configs/evaluate/suites/.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def main(argv=None) -> int:
    import tempfile

    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.evaluate.pipeline import EvaluateArguments, plan_evaluation, run_evaluation
    from sst_lab.tracking.run import stage_run

    args, tracking = parse_stage_args((EvaluateArguments, TrackingArguments), argv)
    with tempfile.TemporaryDirectory(prefix="sst-eval-") as work:
        plan = plan_evaluation(args, tracking, Path(work))
        with stage_run(stage="evaluate", study=tracking.study, config=plan.config, tags=plan.tags,
                       run_name=plan.run_name, tracking_uri=tracking.tracking_uri,
                       config_for_id=plan.config_for_id) as run:
            outcome = run_evaluation(plan, run, tracking.tracking_uri, Path(work), tracking.study)
    if run.enabled:
        print(f"run_id: {run.run_id}\noutput: {outcome.output_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
