"""Measurement (not a test): SST-Merge curvature x point x projection beside linear, over seeds.

For each seed and each variant, runs the merge stage and the evaluate stage in-process into a
sqlite store (temporary, or ``--store``) and appends one JSON line per run to ``--out``: curvature
fidelity (held-out predicted vs measured loss change), subspace stability, eigengap, kept fraction,
and the merged model's refusal rate and task exact match with their n. The seed is the merge seed
(which Fisher and held-out examples are drawn, and the sampled Fisher's label draws) and, with
``--adapters_study``, also the adapter-training seed: seed s merges the utility and safety adapters
of that study's FINISHED train runs of seed s. ``--table`` turns such a file into the markdown
table of merge/README.md (mean and a 95 % t-interval over seeds). Every run is independent and a
(variant, seed) already in ``--out`` is skipped, so a stopped run resumes and partial files are usable.

    # tiny world, one fixed adapter pair, merge seeds 1-3
    .venv/bin/python bench/bench_sst_variants.py --utility_adapter U --safety_adapter S --seeds 1 2 3 \
        --out outputs/bench-sst/results.jsonl
    # SmolLM2: the adapters of each seed of a study, evaluated on the VALIDATION split
    .venv/bin/python bench/bench_sst_variants.py --model smollm2-heldout --adapters_store sqlite:///STORE.db \
        --adapters_study smollm2-heldout --seeds 1 2 3 --k 8 --alpha 1 --out outputs/bench-sst/smollm2.jsonl
    .venv/bin/python bench/bench_sst_variants.py --table outputs/bench-sst/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

VARIANTS = {f"sst-{c}-{p}-{j}": ["--method", "sst", "--curvature", c, "--fisher_point", p, "--projection", j]
            for c in ("empirical", "sampled") for p in ("merged", "own") for j in ("metric", "euclidean")}
# the defaults with 4x the Fisher examples: fisher_n 32 < r^2 = 64 (SmolLM2's merge config) leaves F_u
# rank-deficient, so eps decides part of the spectrum (merge/README.md, Hazards); this measures how much
VARIANTS["sst-sampled-merged-euclidean-n128"] = [*VARIANTS["sst-sampled-merged-euclidean"], "--fisher_n", "128"]
VARIANTS["linear"] = ["--method", "linear"]
VARIANTS["linear-w2"] = ["--method", "linear", "--weights", "1.0", "2.0"]  # = sst at k = r^2, alpha = 2
MERGE_KEYS = ("fidelity/safety_ratio", "fidelity/utility_ratio", "fidelity/safety_measured_change",
              "fidelity/safety_predicted_change", "fidelity/utility_measured_change",
              "fidelity/utility_predicted_change", "fidelity/safety_first_order_change",
              "fidelity/safety_taylor_predicted_change", "fidelity/utility_first_order_change",
              "fidelity/utility_taylor_predicted_change", "subspace_overlap/mean", "eigengap_at_k/mean",
              "kept_fraction/max", "core_in_eps_dominated/mean", "effective_rank_fisher_utility/mean")
# per model: merge config, evaluate config, suites, evaluate arguments (validation split for a real model:
# choosing defaults on test items would tune on the test set)
MODELS = {
    "tiny": ("configs/merge/tiny.yaml", "configs/evaluate/tiny.yaml", ["harmful-demo", "task-demo"], []),
    "smollm2": ("configs/merge/smollm2.yaml", "configs/evaluate/smollm2.yaml", ["advbench-keyword", "sst2-dev"],
                ["--split", "validation", "--preset", "minimal", "--minimal_n", "48"]),
    # the real study's protocol (configs/studies/smollm2-heldout.yaml): SST-2 validation carved from train
    "smollm2-heldout": ("configs/merge/smollm2-heldout.yaml", "configs/evaluate/smollm2-heldout.yaml",
                        ["advbench-keyword", "sst2-heldout"],
                        ["--split", "validation", "--preset", "minimal", "--minimal_n", "48"]),
}


def study_adapters(store: str, study: str, seed: int, dest: Path) -> tuple[str, str]:
    """The adapters the FINISHED utility and safety train runs of ``seed`` in ``study`` logged to MLflow.

    The store's ``adapter`` artifact is the copy that outlives the stage's output folder (the
    ``adapter_path`` tag names a folder that may be gone); it is downloaded into ``dest`` once."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise SystemExit(f"--adapters_study {study}: no such experiment in {store}")
    found = {}
    for role in ("utility", "safety"):
        runs = client.search_runs([exp.experiment_id], f"tags.stage = 'train' and tags.role = '{role}' and "
                                  f"tags.seed = '{seed}' and attributes.status = 'FINISHED'")
        if len(runs) != 1:
            raise SystemExit(f"--adapters_study {study}: {len(runs)} FINISHED {role} train runs of seed {seed} "
                             f"in {store}; expected exactly 1")
        local = dest / f"{role}-s{seed}-{runs[0].info.run_id}"
        if not (local / "adapter" / "SST_LAB_DONE").is_file():
            mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="adapter",
                                                dst_path=str(local), tracking_uri=store)
        if not (local / "adapter" / "SST_LAB_DONE").is_file():
            raise SystemExit(f"--adapters_study {study}: train run {runs[0].info.run_id} ({role}, seed {seed}) "
                             f"logged no complete 'adapter' artifact (no SST_LAB_DONE in {local / 'adapter'})")
        found[role] = str(local / "adapter")
    return found["utility"], found["safety"]


def run_one(name: str, args: list[str], seed: int, opts, store: str, work: Path) -> dict:
    import mlflow

    from sst_lab.evaluate.evaluate import main as evaluate_main
    from sst_lab.merge.merge import main as merge_main

    merge_config, eval_config, suites, eval_args = MODELS[opts.model]
    if opts.adapters_study:
        utility, safety = study_adapters(opts.adapters_store, opts.adapters_study, seed, work / "adapters")
    else:
        utility, safety = opts.utility_adapter, opts.safety_adapter
    out = work / f"{name}-s{seed}"
    extra = ["--k", str(opts.k), "--alpha", str(opts.alpha)] if name.startswith("sst") else []
    if opts.base_model:
        extra += ["--base_model", opts.base_model]
    merge_main(["--config", merge_config, "--utility_adapter", utility, "--safety_adapter",
                safety, *args, *extra, "--seed", str(seed), "--study", "bench-sst", "--tracking_uri",
                store, "--output_dir", str(out), "--run_name", f"{name}-s{seed}"])
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("bench-sst").experiment_id
    merge_run = client.search_runs([exp], f"tags.mlflow.runName = '{name}-s{seed}'", order_by=["attributes.start_time DESC"])[0]
    evaluate_main(["--config", eval_config, "--adapter", str(out), "--suites", *(opts.suites or suites),
                   *eval_args, "--role", "merged", "--seed", str(seed),
                   "--study", "bench-sst", "--tracking_uri", store, "--run_name", f"eval-{name}-s{seed}"])
    eval_run = client.search_runs([exp], f"tags.mlflow.runName = 'eval-{name}-s{seed}'",
                                  order_by=["attributes.start_time DESC"])[0]
    row = {"variant": name, "seed": seed, "k": opts.k, "alpha": opts.alpha, "model": opts.model,
           "utility_adapter": utility, "safety_adapter": safety, "merge_run": merge_run.info.run_id,
           "eval_run": eval_run.info.run_id}
    row.update({k: merge_run.data.metrics[f"merge/{k}"] for k in MERGE_KEYS if f"merge/{k}" in merge_run.data.metrics})
    row.update({k: v for k, v in eval_run.data.metrics.items()
                if k.endswith(("refusal_rate", "exact_match", "balanced_accuracy", "/n", "compliance_rate_safe"))})
    return row


def table(path: Path) -> str:
    """Markdown: per variant, each column's mean and 95 % t-interval over the seeds in ``path``."""
    from sst_lab.tracking.aggregation import metric_range, summarize

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cols = {"safety/harmful-demo/refusal_rate": "refusal", "utility/task-demo/exact_match": "task EM",
            "safety/advbench-keyword/refusal_rate": "refusal AdvBench", "utility/sst2-dev/exact_match": "SST-2 EM",
            "utility/sst2-dev/label_accuracy": "SST-2 label acc.",
            "utility/sst2-heldout/balanced_accuracy": "SST-2 bal. acc.",
            "fidelity/safety_measured_change": "ΔL_s measured", "fidelity/safety_predicted_change": "ΔL_s predicted",
            "fidelity/safety_taylor_predicted_change": "ΔL_s Taylor (g·δ + quad.)",
            "fidelity/utility_measured_change": "ΔL_u measured", "fidelity/utility_predicted_change": "ΔL_u predicted",
            "fidelity/utility_taylor_predicted_change": "ΔL_u Taylor",
            "subspace_overlap/mean": "overlap", "eigengap_at_k/mean": "gap λk/λk+1",
            "kept_fraction/max": "kept max", "core_in_eps_dominated/mean": "core in ε-dom."}
    present = [c for c in cols if any(c in r for r in rows)]
    lines = ["| variant | seeds | " + " | ".join(cols[c] for c in present) + " |", "|" + "---|" * (len(present) + 2)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sel = [r for r in rows if r["variant"] == variant]
        cells = []
        for c in present:
            vals = [r[c] for r in sel if c in r]
            if not vals:
                cells.append("")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3g}")
            else:  # the aggregate stage's t-interval over seeds, a proportion's cut to [0, 1]
                t = summarize(vals, bounds=metric_range(c))
                cells.append(f"{t.mean:.3g} ± {t.ci_high - t.mean:.2g}" if not t.clipped
                             else f"{t.mean:.3g} [{t.ci_low:.2g}, {t.ci_high:.2g}]")
        lines.append(f"| {variant} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--utility_adapter")
    p.add_argument("--safety_adapter")
    p.add_argument("--adapters_store", help="MLflow store of --adapters_study")
    p.add_argument("--adapters_study", help="take seed s's adapters from this study's train runs of seed s")
    p.add_argument("--base_model", help="the merge's base_model (default: the adapters' base_model_name_or_path; "
                   "give the model's name when that folder has moved: the adapters' weight fingerprint is checked)")
    p.add_argument("--store", type=Path, help="sqlite file for the bench's own runs (default: temporary)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in ("linear-w2", "sst-sampled-merged-euclidean-n128")])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--suites", nargs="+", help="default: the model's (MODELS)")
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path)
    opts = p.parse_args()
    if opts.table:
        print(table(opts.table))
        return
    if not opts.adapters_study and not (opts.utility_adapter and opts.safety_adapter):
        p.error("give --utility_adapter and --safety_adapter, or --adapters_store and --adapters_study")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if opts.out.exists():
        done = {(r["variant"], r["seed"]) for r in map(json.loads, opts.out.read_text().splitlines()) if r}
    with tempfile.TemporaryDirectory(prefix="bench-sst-") as tmp:
        if opts.store:
            opts.store.parent.mkdir(parents=True, exist_ok=True)
        store = f"sqlite:///{(opts.store or Path(tmp) / 'mlflow.db').resolve()}"
        work = (opts.store.parent if opts.store else Path(tmp))
        for seed in opts.seeds:
            for name in opts.variants:
                if (name, seed) in done:
                    continue
                row = run_one(name, VARIANTS[name], seed, opts, store, work)
                with opts.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
