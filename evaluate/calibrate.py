"""Calibrate stage: measure a judge against people on human-labelled completions, tracked in MLflow.

    python evaluate/calibrate.py --config configs/calibrate/keyword.yaml
    python evaluate/calibrate.py --config configs/calibrate/guard-tiny.yaml
    python evaluate/calibrate.py --config configs/calibrate/rubric-tiny.yaml --rubric_template <file>

Logs agreement, Cohen's kappa, sensitivity and specificity for refusal (Wilson intervals) overall,
per prompt type (safe / unsafe) and per source model; the confusion matrix and per-item table as
artifacts. Evaluate runs link the latest FINISHED calibration of each judge they use (tags
``calibration_run.<judge>``). Library: ``sst_lab.evaluate.calibration``.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def main(argv=None) -> int:
    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.evaluate.calibration import CalibrateArguments, run_calibration

    args, tracking = parse_stage_args((CalibrateArguments, TrackingArguments), argv)
    run_id, cal = run_calibration(args, tracking)
    if cal is None:
        print(f"run_id: {run_id}\nreused: a FINISHED calibrate run of the same judge, data and settings")
    elif run_id is not None:
        m = cal.metrics
        print(f"run_id: {run_id}\njudge_id: {cal.judge_id}")
        for name in ("all", "type_safe", "type_unsafe"):
            parts = [f"{k}={m[f'calibration/{name}/{k}']:.3f}" for k in ("agreement", "kappa", "sensitivity",
                                                                         "specificity") if f"calibration/{name}/{k}" in m]
            print(f"{name}: n={int(m[f'calibration/{name}/n'])} " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
