"""Select stage: choose one merge setting of a family from its validation-split evaluations.

    python tracking/select.py --candidates <eval run id> ... --reference <utility eval run id> \\
        --safety_metric safety/advbench/refusal_rate --utility_metric utility/sst2/accuracy \\
        --rule max_safety_within_delta --delta 0.02 --budget 4 --seed 1 --study <study>

Only FINISHED evaluate runs tagged ``split=validation`` are accepted (a test-split run is refused).
``--fallback refuse`` fails the run when no candidate meets the rule (default ``min_loss``: choose
the smallest utility loss and tag ``select.admissible=false``). ``--constraints METRIC=DELTA ...``
bounds further validation metrics' loss against the reference the same way (e.g. XSTest safe-prompt
compliance: ``overrefusal/xstest-keyword/compliance_rate_safe=0.1``).
Logs the choice as tags (``select.chosen_merge_run_id`` ...), metrics (``select/chosen/...``) and
``select/frontier.json`` (every candidate, its utility loss, admissibility, Pareto frontier flag).
See sst_lab.tracking.selection. Prints the run id.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def make_parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", nargs="+", required=True, help="Validation evaluate runs of the candidates.")
    p.add_argument("--reference", required=True, help="Validation evaluate run of the utility adapter.")
    p.add_argument("--safety_metric", required=True)
    p.add_argument("--utility_metric", required=True)
    p.add_argument("--rule", default="max_safety_within_delta")
    p.add_argument("--delta", type=float, default=0.02)
    p.add_argument("--budget", type=int, help="Declared number of candidates (checked).")
    p.add_argument("--fallback", default="min_loss", choices=("min_loss", "refuse"),
                   help="No admissible candidate: min_loss (choose the smallest utility loss, tagged "
                        "select.admissible=false) or refuse (the run fails, naming family and seed).")
    p.add_argument("--constraints", nargs="*", default=[], metavar="METRIC=DELTA",
                   help="Further validation metrics whose loss vs the reference may be at most DELTA.")
    p.add_argument("--family", default="none", help="The tuned method (label in tags and the report).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--study", default="default")
    p.add_argument("--tracking_uri")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    import mlflow

    from sst_lab.tracking.run import resolve_tracking_uri, stage_run
    from sst_lab.tracking.selection import parse_constraints, record_tags_metrics, select_from_runs

    uri = resolve_tracking_uri(args.tracking_uri)
    constraints = parse_constraints(args.constraints)
    # fallback and constraints only when not the default: select runs of before keep their config ids
    settings = {k: v for k, v in vars(args).items()
                if k != "tracking_uri" and not (k == "fallback" and v == "min_loss")
                and not (k == "constraints" and not v)}
    for_id = {**settings, "candidates": sorted(args.candidates)}
    tags = {"role": "select", "seed": args.seed, "upstream_run_ids": ",".join([*args.candidates, args.reference]),
            "select.family": args.family}
    with stage_run(stage="select", study=args.study, config={"select": settings}, config_for_id={"select": for_id},
                   tags=tags, run_name=f"select-{args.family}-s{args.seed}", tracking_uri=uri) as run:
        client = mlflow.MlflowClient(tracking_uri=uri)
        record = select_from_runs(client, args.candidates, args.reference, safety_metric=args.safety_metric,
                                  utility_metric=args.utility_metric, rule=args.rule, delta=args.delta,
                                  budget=args.budget, fallback=args.fallback, constraints=constraints,
                                  what=f"select family {args.family}, seed {args.seed}")
        record["family"] = args.family
        extra_tags, metrics = record_tags_metrics(record)
        run.set_tags(extra_tags)
        run.log_metrics(metrics)
        run.log_json(record, "select/frontier.json")
        if not record["admissible"]:  # the declared fallback chose: say so where the sweep's log shows it
            print(f"WARNING: select family {args.family}, seed {args.seed}: no candidate meets rule {args.rule} "
                  f"(delta {args.delta}{', constraints ' + ' '.join(args.constraints) if args.constraints else ''}); "
                  f"chose {record['chosen']['label']} by the declared fallback {args.fallback} "
                  "(tag select.admissible=false)")
    if run.enabled:
        print(f"run_id: {run.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
