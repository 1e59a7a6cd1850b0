"""Write a study's HTML report (table + plots, also as PNG) and log it to the study's report run.

    python tracking/report.py --study tiny [--config configs/studies/tiny.yaml] [--output_dir DIR]

Reads the aggregate runs (run tracking/aggregate.py first) and the SST merge reports. Metric
choices come from the study's ``report:`` section (with --config), else the flags, else the first
matching evaluate metric. Rerunning with the same choices updates the same report run. Prints
``run_id: <id>`` and ``report: <path to report.html>``.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def make_parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="The study (MLflow experiment).")
    p.add_argument("--config", help="The study YAML, for its report: section (metric choices).")
    p.add_argument("--tracking_uri", help="Default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db.")
    p.add_argument("--output_dir", help="New folder for the report (default outputs/<study>/report-<time>).")
    for col in ("safety", "overrefusal", "utility"):
        p.add_argument(f"--{col}_metric", help=f"Evaluate metric of the {col} column.")
    p.add_argument("--reference_method", help="Merge method the significance marks compare against.")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    import datetime as dt
    import tempfile

    import mlflow

    from sst_lab.config import ConfigError
    from sst_lab.tracking import reporting
    from sst_lab.tracking.aggregation import DUPLICATE_RULE
    from sst_lab.tracking.selection_report import selection_section
    from sst_lab.tracking.run import TrackingError, config_id, resolve_tracking_uri, stage_run

    chosen = {"safety": args.safety_metric, "overrefusal": args.overrefusal_metric, "utility": args.utility_metric,
              "reference_method": args.reference_method}
    try:
        if args.config:
            from sst_lab.tracking.study import load_study

            spec = load_study(args.config, name=args.study).report
            for col in ("safety", "overrefusal", "utility"):
                chosen[col] = chosen[col] or getattr(spec, f"{col}_metric")
            chosen["reference_method"] = chosen["reference_method"] or spec.reference_method
        uri = resolve_tracking_uri(args.tracking_uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(args.study)
        if exp is None:
            raise TrackingError(f"study {args.study!r} has no experiment in {uri}")
        data = reporting.build(args.study, reporting.load_aggregates(client, exp.experiment_id), chosen,
                               chosen["reference_method"])
    except (ConfigError, TrackingError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    duplicates = sorted(i for a in data.aggs for i in a.tags.get("aggregate.ignored_run_ids", "none").split(",")
                        if i != "none")
    if duplicates:
        print(f"report: {len(duplicates)} duplicate run(s) of a seed were left out by aggregation "
              f"({DUPLICATE_RULE}): {', '.join(duplicates)}")
    out = Path(args.output_dir or Path("outputs") / args.study / f"report-{dt.datetime.now():%Y%m%d-%H%M%S}")
    config = {"report": {k: v for k, v in chosen.items()}}
    cid = config_id(config)
    olds = client.search_runs([exp.experiment_id], filter_string=f"tags.stage = 'report' and tags.config_id = '{cid}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    tags = {"role": "report", "report.metrics": ",".join(data.metrics.values()),
            "report.reference_method": data.reference_method or "none",
            "upstream_run_ids": ",".join(a.run_id for a in data.aggs)[:5000],
            "report.duplicate_rule": DUPLICATE_RULE, "report.ignored_run_ids": ",".join(duplicates)[:5000] or "none"}
    with stage_run(stage="report", study=args.study, config=config, tags=tags, run_name=f"report-{args.study}",
                   tracking_uri=uri, resume_run_id=olds[0].info.run_id if olds else None) as run:
        with tempfile.TemporaryDirectory(prefix="sst-report-") as work:
            spectra = reporting.merge_spectra(client, exp.experiment_id, Path(work))
            selection = selection_section(client, exp.experiment_id, Path(work), data.metrics["safety"],
                                          data.metrics["utility"], data.metrics.get("overrefusal"))
        files = reporting.write_report(data, spectra, out, selection)
        run.log_artifacts(out, "report")
        run.log_metrics({"report/n_aggregates": len(data.aggs), "report/n_spectra": len(spectra)})
    print(f"run_id: {run.run_id}\nreport: {files['report'].resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
