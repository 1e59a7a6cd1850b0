"""Measurement (not a test): SST-Merge curvature x point x projection beside linear, over seeds.

For each seed (the merge seed: which Fisher and held-out examples are drawn, and the sampled
Fisher's label draws) and each variant, runs the merge stage and the evaluate stage in-process on a
fixed pair of trained adapters, into a temporary sqlite store, and appends one JSON line per run to
``--out``: curvature fidelity (held-out predicted vs measured loss change), subspace stability,
eigengap, kept fraction, and the merged model's refusal rate and task exact match with their n.
``--table`` turns such a file into the markdown table of merge/README.md (mean and a 95 % t-interval
over seeds). Run it alone and niced; every run is independent, so partial files are usable.

    .venv/bin/python bench/bench_sst_variants.py --utility_adapter U --safety_adapter S --seeds 1 2 3 \
        --out outputs/bench-sst/results.jsonl
    .venv/bin/python bench/bench_sst_variants.py --table outputs/bench-sst/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

VARIANTS = {f"sst-{c}-{p}-{j}": ["--method", "sst", "--curvature", c, "--fisher_point", p, "--projection", j]
            for c in ("empirical", "sampled") for p in ("merged", "own") for j in ("metric", "euclidean")}
VARIANTS["linear"] = ["--method", "linear"]
VARIANTS["linear-w2"] = ["--method", "linear", "--weights", "1.0", "2.0"]  # = sst at k = r^2, alpha = 2
MERGE_KEYS = ("fidelity/safety_ratio", "fidelity/utility_ratio", "fidelity/safety_measured_change",
              "fidelity/safety_predicted_change", "fidelity/utility_measured_change",
              "fidelity/utility_predicted_change", "subspace_overlap/mean", "eigengap_at_k/mean",
              "kept_fraction/max", "core_in_eps_dominated/mean", "effective_rank_fisher_utility/mean")
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}


def run_one(name: str, args: list[str], seed: int, opts, store: str, work: Path) -> dict:
    import mlflow

    from sst_lab.evaluate.evaluate import main as evaluate_main
    from sst_lab.merge.merge import main as merge_main

    out = work / f"{name}-s{seed}"
    extra = ["--k", str(opts.k), "--alpha", str(opts.alpha)] if name.startswith("sst") else []
    merge_main(["--config", "configs/merge/tiny.yaml", "--utility_adapter", opts.utility_adapter, "--safety_adapter",
                opts.safety_adapter, *args, *extra, "--seed", str(seed), "--study", "bench-sst", "--tracking_uri",
                store, "--output_dir", str(out), "--run_name", f"{name}-s{seed}"])
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("bench-sst").experiment_id
    merge_run = client.search_runs([exp], f"tags.mlflow.runName = '{name}-s{seed}'")[0]
    evaluate_main(["--config", "configs/evaluate/tiny.yaml", "--adapter", str(out), "--suites", *opts.suites,
                   "--role", "merged",
                   "--study", "bench-sst", "--tracking_uri", store, "--run_name", f"eval-{name}-s{seed}"])
    eval_run = client.search_runs([exp], f"tags.mlflow.runName = 'eval-{name}-s{seed}'")[0]
    row = {"variant": name, "seed": seed, "k": opts.k, "alpha": opts.alpha}
    row.update({k: merge_run.data.metrics[f"merge/{k}"] for k in MERGE_KEYS if f"merge/{k}" in merge_run.data.metrics})
    row.update({k: v for k, v in eval_run.data.metrics.items()
                if k.endswith(("refusal_rate", "exact_match", "/n", "compliance_rate_safe"))})
    return row


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cols = {"safety/harmful-demo/refusal_rate": "refusal", "utility/task-demo/exact_match": "task EM",
            "fidelity/safety_measured_change": "ΔL_s measured", "fidelity/safety_predicted_change": "ΔL_s predicted",
            "fidelity/utility_measured_change": "ΔL_u measured", "fidelity/utility_predicted_change": "ΔL_u predicted",
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
            else:
                half = T975.get(len(vals) - 1, 2.0) * statistics.stdev(vals) / len(vals) ** 0.5
                cells.append(f"{statistics.mean(vals):.3g} ± {half:.2g}")
        lines.append(f"| {variant} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utility_adapter")
    p.add_argument("--safety_adapter")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "linear-w2"])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--suites", nargs="+", default=["harmful-demo", "task-demo"])
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path)
    opts = p.parse_args()
    if opts.table:
        print(table(opts.table))
        return
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-sst-") as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        for seed in opts.seeds:
            for name in opts.variants:
                row = run_one(name, VARIANTS[name], seed, opts, store, Path(tmp))
                with opts.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
