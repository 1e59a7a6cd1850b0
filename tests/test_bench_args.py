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
