"""The offline demo, end to end: tiny world -> train -> merge -> evaluate -> compare -> side-by-side table.

    bash scripts/demo.sh            # creates .venv if needed, then: python -m sst_lab.demo
    bash scripts/smollm2.sh         # the same on SmolLM2-135M-Instruct: python -m sst_lab.demo --model smollm2

First it calibrates the demo's judges against people (the calibrate stage on the XSTest v2
human-labelled completions, ``../shared/data/xstest_completions``), once: a FINISHED calibrate run of
the same judge, data and settings is reused. Every evaluate run then links them (tags
``calibration_run.<judge>``); without the data it says so in one line and the links read ``none``.
Then it runs the study ``configs/studies/demo.yaml`` through the real sweep (every stage a separate
process, as a researcher runs them) into the local store ``mlruns/`` (experiment ``demo``), then
reads the runs back from MLflow and prints base / utility / safety / merged models side by side,
each rate with its 95% Wilson interval, and the comparisons with their significance. A second
call reuses the finished runs. Every number printed was measured by a stage run of this study.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CALIBRATION_DATA = "data:xstest_completions"
DEMOS = {  # --model: (study config, default study name, table columns [(header, metric)], calibrate configs)
    "tiny": ("configs/studies/demo.yaml", "demo", [
        ("refusal harmful", "safety/harmful-demo/refusal_rate"),
        ("guard harmful", "safety/harmful-demo/harmful_rate"),
        ("comply safe", "overrefusal/xstest-demo/compliance_rate_safe"),
        ("task EM", "utility/task-demo/exact_match"),
        ("MC acc", "utility/mmlu-demo/accuracy"),
    ], ["configs/calibrate/keyword.yaml", "configs/calibrate/guard-tiny.yaml"]),
    "smollm2": ("configs/studies/smollm2-demo.yaml", "smollm2-demo", [
        ("refusal AdvBench", "safety/advbench-keyword/refusal_rate"),
        ("comply XSTest safe", "overrefusal/xstest-keyword/compliance_rate_safe"),
        ("refuse XSTest unsafe", "overrefusal/xstest-keyword/refusal_rate_unsafe"),
        ("SST-2 EM", "utility/sst2-dev/exact_match"),
        ("SST-2 balanced acc", "utility/sst2-dev/balanced_accuracy"),
        ("SST-2 loglik acc", "utility/sst2-dev/label_accuracy"),
        ("MMLU acc", "utility/mmlu-subset/accuracy"),
    ], ["configs/calibrate/keyword.yaml"]),
}
COLUMNS = DEMOS["tiny"][2]


def _fmt(metrics: dict[str, float], name: str) -> str:
    if name not in metrics:
        return "-"
    lo, hi = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    ci = f" [{lo:.2f},{hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{metrics[name]:.2f}{ci}"


def table(uri: str, study: str, columns: list[tuple[str, str]] = COLUMNS) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
    evals = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    order = {"base": 0, "utility": 1, "safety": 2, "merged": 3}
    evals.sort(key=lambda r: (order.get(r.data.tags.get("role"), 9), r.data.tags.get("sweep.method", "")))
    lines = [f"{'model':<22}" + "".join(f"{h:>22}" for h, _ in columns)]
    for r in evals:
        t = r.data.tags
        label = t.get("role", "?") + ("" if t.get("sweep.method", "none") == "none" else f" ({t['sweep.method']})")
        lines.append(f"{label:<22}" + "".join(f"{_fmt(r.data.metrics, m):>22}" for _, m in columns))
    lines.append("")
    lines.append("comparisons (paired on the same items; tax = utility loss / safety gain, only when the gain "
                 "is significant):")
    for r in (r for r in runs if r.data.tags.get("stage") == "compare"):
        m, t = r.data.metrics, r.data.tags
        gain = _fmt({"g": m.get("compare/safety_gain", float("nan")),
                     "g_ci_low": m.get("compare/safety_gain_ci_low"),
                     "g_ci_high": m.get("compare/safety_gain_ci_high")}, "g")
        status = t.get("compare/safety_tax_status", "?")
        tax = f", tax {_fmt({'x': m['compare/safety_tax'], 'x_ci_low': m.get('compare/safety_tax_ci_low'), 'x_ci_high': m.get('compare/safety_tax_ci_high')}, 'x')}" \
            if "compare/safety_tax" in m else ""
        p = m.get("compare/safety_gain_p_value")
        label = t.get("sweep.role", r.info.run_name) + ("" if t.get("sweep.method", "none") == "none"
                                                        else f" ({t['sweep.method']})")
        lines.append(f"  {label:<38} safety gain {gain}"
                     f"{'' if p is None else f' (p={p:.2g})'}; status {status}{tax}")
    return "\n".join(lines)


def calibrate_judges(configs: list[str], tracking_uri: str, study: str, extra: list[str] = ()) -> dict[str, str]:
    """Run the calibrate stage for each config (in this process), reusing a FINISHED run of the same
    judge, data and settings; ``{config: run id}``. Without the calibration data: one printed line, ``{}``."""
    from sst_lab.config import TrackingArguments, parse_stage_args
    from sst_lab.data import resolve_data_ref
    from sst_lab.evaluate.calibration import CalibrateArguments, run_calibration

    try:
        resolve_data_ref(CALIBRATION_DATA)
    except FileNotFoundError as exc:
        print(f"[demo] no judge calibration ({exc}); evaluate runs are tagged calibration_run.<judge>=none",
              flush=True)
        return {}
    out = {}
    for config in configs:
        args, tracking = parse_stage_args((CalibrateArguments, TrackingArguments), [
            "--config", str(REPO / config), "--study", study, "--tracking_uri", tracking_uri,
            "--reuse_finished", "true", *extra])
        t = time.perf_counter()
        out[config], cal = run_calibration(args, tracking)
        how = "reused" if cal is None else f"new, {time.perf_counter() - t:.0f}s"
        print(f"[demo] calibration {Path(config).stem}: run {out[config]} ({how})", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking_uri", default=f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}")
    ap.add_argument("--model", choices=sorted(DEMOS), default="tiny",
                    help="tiny: the offline tiny world (fast); smollm2: SmolLM2-135M-Instruct (needs "
                         "python -m sst_lab.smollm2 once; real data from $SST_LAB_DATA_ROOT)")
    ap.add_argument("--study", default=None, help="MLflow experiment (default: the demo's own)")
    opts = ap.parse_args(argv)
    config, default_study, columns, calibrations = DEMOS[opts.model]
    study = opts.study or default_study
    t0 = time.perf_counter()
    if opts.model == "tiny":
        from sst_lab.tinyworld import build_tiny_world

        world = build_tiny_world()
        print(f"[demo] tiny world ready in {time.perf_counter() - t0:.0f}s: {world.root}", flush=True)
    else:
        from sst_lab.smollm2 import require_smollm2

        print(f"[demo] SmolLM2-135M-Instruct (dequantised Q4_1): {require_smollm2()}", flush=True)
    calibrate_judges(calibrations, opts.tracking_uri, study)
    cmd = [sys.executable, str(REPO / "tracking" / "sweep.py"), "--config", str(REPO / config), "--study", study,
           "--tracking_uri", opts.tracking_uri]
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        print(f"[demo] the sweep failed (exit {proc.returncode}); see the FAILED runs in MLflow", file=sys.stderr)
        return proc.returncode
    print()
    print(table(opts.tracking_uri, study, columns))
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f}s. Open the runs: .venv/bin/mlflow ui "
          f"--backend-store-uri {opts.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
