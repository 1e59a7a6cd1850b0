"""Run a study: expand its grid and run every stage as its own process, reusing finished runs.

    python tracking/sweep.py --config configs/studies/tiny.yaml                  # run (resumes)
    python tracking/sweep.py --config configs/studies/tiny.yaml --dry-run        # print the plan
    python tracking/sweep.py --config ... --workers 4 --tracking_uri http://127.0.0.1:5000
    python tracking/sweep.py --config ... --emit_slurm outputs/slurm/tiny        # sbatch scripts
    python tracking/sweep.py --config ... --node <node id>                       # one node (Slurm jobs)

See tracking/README.md. Exit code 0 when every node finished or was reused, 1 when a node failed
or could not run, 2 for a bad study or command line, 128 + signal number when interrupted.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def make_parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="Study YAML (configs/studies/*.yaml).")
    p.add_argument("--study", help="MLflow experiment name; default: the study's name.")
    p.add_argument("--tracking_uri", help="Default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db.")
    p.add_argument("--workers", type=int, help="Stage processes at once (default: the study's workers).")
    p.add_argument("--on_failure", "--on-failure", choices=("stop", "continue"), help="Default: the study's.")
    p.add_argument("--output_root", help="Outputs go to <output_root>/<study>/ (default: the study's, outputs/).")
    p.add_argument("--stages", help="Comma-separated stages to run (others are only reused), e.g. train,merge.")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="Print the plan; run nothing.")
    p.add_argument("--rerun_running", action="store_true",
                   help="Treat RUNNING runs that may still be alive on another host as abandoned (marked FAILED).")
    p.add_argument("--node", help="Run only this node (its upstream runs must have FINISHED); used by Slurm jobs.")
    p.add_argument("--emit_slurm", "--emit-slurm", metavar="DIR", help="Write sbatch scripts + submit.sh; run nothing.")
    p.add_argument("--allow_local_store", action="store_true", help="Let --emit_slurm point jobs at a sqlite store.")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    from sst_lab.config import ConfigError
    from sst_lab.redact import redact_text
    from sst_lab.tracking import study as st

    try:
        study = st.load_study(args.config, name=args.study)
        nodes = st.expand(study)
        stages = set(args.stages.split(",")) if args.stages else None
        if stages and not stages <= set(st.STAGE_SPECS):
            raise ConfigError(f"--stages: unknown {sorted(stages - set(st.STAGE_SPECS))}; known {list(st.STAGE_SPECS)}")
        ctx, store = st.prepare(study, tracking_uri=args.tracking_uri, output_root=args.output_root,
                                workers=args.workers, on_failure=args.on_failure,
                                create=not (args.dry_run or args.emit_slurm))
        plan = st.make_plan(nodes, store.attempts(), stages=stages, rerun_running=args.rerun_running)
        if args.node:
            plan = st.single_node_plan(plan, args.node)
    except (ConfigError, st.PlanError) as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"sweep: the tracking store does not answer: {redact_text(str(exc))[:800]}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(st.describe_plan(plan, ctx))
        return 0
    if args.emit_slurm:
        try:
            path = st.emit_slurm(plan, study, args.config, ctx, Path(args.emit_slurm),
                                 allow_local_store=args.allow_local_store)
        except ConfigError as exc:
            print(f"sweep: {exc}", file=sys.stderr)
            return 2
        print(f"slurm: {path}")
        return 0
    if ctx.uri.startswith("sqlite:") and ctx.workers > 4:
        print(f"sweep: warning: {ctx.workers} workers on a sqlite store; for many workers use an mlflow server "
              "backed by PostgreSQL (tracking/README.md)", file=sys.stderr)
    print(st.describe_plan(plan, ctx).splitlines()[-1], flush=True)
    try:
        outcomes = st.execute(plan, ctx, store)
    except st.SweepInterrupted as exc:
        print(st.summarize(exc.outcomes), file=sys.stderr)
        print(f"summary: {st.write_summary(exc.outcomes, ctx)}")
        return 128 + exc.signum
    print(st.summarize(outcomes))
    print(f"summary: {st.write_summary(outcomes, ctx)}")
    return 0 if all(o.status in ("finished", "reused") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
