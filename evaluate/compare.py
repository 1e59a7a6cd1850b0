"""Compare stage: a candidate evaluate run against a reference evaluate run, item by item.

    python evaluate/compare.py --reference <evaluate run id> --candidate <evaluate run id> \
        [--safety_suite harmful-demo] [--utility_suite task-demo] [--safety_judge refusal_keyword]

Logs compare/safety_gain, compare/utility_loss and (only when the safety gain is significantly
positive) compare/safety_tax, each with _ci_low/_ci_high and p-values, the minimum detectable
effects, and the tag compare/safety_tax_status. Prints the run id and the status at the end.
Library use (a sweep): ``sst_lab.evaluate.comparison.run_compare`` / ``compare_runs``.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def main(argv=None) -> int:
    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.evaluate.comparison import CompareArguments, run_compare

    args, tracking = parse_stage_args((CompareArguments, TrackingArguments), argv)
    run_id, comparison = run_compare(args, tracking)
    r = comparison.result
    if r.identical:
        print("warning: the candidate's outcomes equal the reference's on every compared item", file=sys.stderr)
    if run_id is not None:
        print(f"run_id: {run_id}\nsafety_tax_status: {r.status}\nsafety_gain: {r.safety_gain:+.4f} "
              f"(p={r.safety_p_value:.3g})\nutility_loss: {r.utility_loss:+.4f} (p={r.utility_p_value:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
