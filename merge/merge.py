"""Merge stage: merge a safety LoRA adapter into a utility LoRA adapter (SST-Merge or a baseline).

    python merge/merge.py --config configs/merge/tiny.yaml --utility_adapter <train run id> \
        --safety_adapter <train run id> --method sst --k 16 --alpha 1.0 --study my-study

Inputs are adapter folders or MLflow run ids of train runs (lineage tags follow). Prints the run
id and the merged adapter path at the end. Methods: ``python merge/merge.py --list_methods``.
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a stage folder must not shadow installed packages (e.g. HF `evaluate`)


def main(argv=None) -> int:
    import tempfile

    from sst_lab.config import TrackingArguments, parse_stage_args, to_dict
    from sst_lab.merge.methods import available_methods
    from sst_lab.merge.pipeline import MergeArguments, resolve_inputs, run_merge
    from sst_lab.redact import redact
    from sst_lab.tracking.lineage import lineage_ids
    from sst_lab.tracking.run import stage_run

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list_methods" in argv:
        print("\n".join(available_methods()))
        return 0
    args, tracking = parse_stage_args((MergeArguments, TrackingArguments), argv)
    with tempfile.TemporaryDirectory(prefix="sst-merge-") as work:
        inputs = resolve_inputs(args, Path(work), tracking.tracking_uri)
        sizes = {inputs.utility.tags.get("sample_size"), inputs.safety.tags.get("sample_size")}
        size = sizes.pop() if len(sizes) == 1 else (f"utility={inputs.utility.tags.get('sample_size')},"
                                                    f"safety={inputs.safety.tags.get('sample_size')}")
        weights = ",".join(str(w) for w in args.weights) if args.weights is not None else None
        setting = "-".join(f"{k}{v}" for k, v in (("k", args.k), ("kg", args.k_global), ("a", args.alpha),
                                                   ("d", args.density), ("l", args.ties_lambda), ("w", weights))
                           if v is not None)
        setting = args.method + ("-" + setting if setting else "")  # what tells merges apart, first in names
        run_name = args.run_name or f"merge-{setting}-{Path(inputs.base_model).name}-n{size}-s{args.seed}"
        out_dir = Path(args.output_dir or Path("outputs") / tracking.study / run_name)
        config = redact({"merge": to_dict(args), "tracking": to_dict(tracking)})
        for_id = {"merge": {**config["merge"], "utility_adapter": inputs.utility.identity,
                            "safety_adapter": inputs.safety.identity}}
        tags = {"base_model": inputs.base_model, "role": "merged", "merge_method": args.method,
                "merge_setting": setting, "sample_size": size, "seed": args.seed,
                "upstream_run_ids": ",".join(lineage_ids(inputs.utility, inputs.safety)) or "none",
                "utility_run_id": inputs.utility.run_id or "none", "safety_run_id": inputs.safety.run_id or "none"}
        if inputs.trained_elsewhere:
            tags["adapter_trained_elsewhere"] = ",".join(inputs.trained_elsewhere)
        with stage_run(stage="merge", study=tracking.study, config=config, tags=tags, run_name=run_name,
                       tracking_uri=tracking.tracking_uri, config_for_id=for_id) as run:
            outcome = run_merge(args, inputs, run, config, out_dir)
    if run.enabled:
        print(f"run_id: {run.run_id}\nadapter: {outcome.adapter_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
