"""Aggregate a study over seeds: one stage=aggregate MLflow run per config group (mean, std, n, 95% CI).

    python tracking/aggregate.py --study tiny [--tracking_uri sqlite:///mlruns/mlflow.db]

Rerunning updates each group's aggregate run in place (never a duplicate). See
sst_lab.tracking.aggregation for what is logged.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def make_parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="The study (MLflow experiment) to aggregate.")
    p.add_argument("--tracking_uri", help="Default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db.")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from sst_lab.tracking.aggregation import write_aggregates
    from sst_lab.tracking.selection_report import write_selected_aggregates
    from sst_lab.tracking.run import TrackingError

    try:
        written = write_aggregates(args.study, args.tracking_uri)
        written += write_selected_aggregates(args.study, args.tracking_uri)  # studies with a selection
    except TrackingError as exc:
        print(f"aggregate: {exc}", file=sys.stderr)
        return 2
    print(f"aggregate runs: {len(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
