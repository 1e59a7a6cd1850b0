"""The three benchmarks in bench/ take the model by name (their runs are not tests: see the README)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SMOL = "smollm2-135m-instruct-q4"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, extra", [
    ("eval", ["--parts", "sst2", "--sst2_n", "48"]),
    ("train", ["--batch", "4", "--max_length", "64", "--sample_size", "32"]),
    ("fisher", ["--n", "8", "--seq", "64"]),
])
def test_each_bench_takes_the_model_and_defaults_to_the_tiny_world(name, extra):
    parser = _bench(name).make_parser()
    assert parser.parse_args([]).model == "tiny-world"
    assert parser.parse_args(["--model", SMOL, *extra]).model == SMOL


def test_bench_train_maps_the_model_to_its_configs_and_refuses_others():
    bench = _bench("train")
    repo = BENCH.parent
    assert all((repo / cfg).is_file() for cfgs in bench.MODELS.values() for cfg in cfgs)
    with pytest.raises(SystemExit):
        bench.make_parser().parse_args(["--model", "no-such-model"])


def test_sst_variant_table_gives_the_t_interval_over_seeds(tmp_path):
    """Three seeds: t(0.975, 2 df) = 4.303 (the table once used 1 df's 12.706); a rate's interval is
    cut to [0, 1]."""
    import json

    from scipy import stats

    rows = [{"variant": "v", "seed": s, "fidelity/safety_measured_change": x, "safety/harmful-demo/refusal_rate": r}
            for s, x, r in ((1, 1.0, 0.0), (2, 2.0, 0.1), (3, 4.0, 0.5))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _bench("sst_variants").table(path).splitlines()[-1]
    half = stats.t.ppf(0.975, 2) * stats.tstd([1.0, 2.0, 4.0]) / 3 ** 0.5
    assert f"| v | 3 | 0.2 [0, {0.2 + stats.t.ppf(0.975, 2) * stats.tstd([0, 0.1, 0.5]) / 3 ** 0.5:.2g}] |" in line
    assert f"2.33 ± {half:.2g} |" in line and abs(half - 3.79) < 0.01
