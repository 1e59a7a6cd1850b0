"""A suite's validation carved from a training file, and the train stage's exclusion of it.

Small SST-2-layout files written here drive the train stage in process (tiny model, one step); one
test reads the real SST-2 files (no training) to check the shipped suite and train config.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO, SHARED_DATA
from sst_lab.config import ConfigError
from sst_lab.data import load_training_records, sample, training_items
from sst_lab.evaluate.pipeline import TrainingOverlapError, check_training_overlap
from sst_lab.evaluate.splits import SplitError, load_split
from sst_lab.evaluate.suites import load_items, load_suite
from sst_lab.held_out import HELD_OUT_FILE, exclude_held_out, held_out_items

WORDS = ["bright", "dull", "warm", "cold", "witty", "flat", "tender", "stale", "bold", "limp"]


def _tsv(path: Path, sentences: list[str]) -> Path:
    rows = ["sentence\tlabel"] + [f"{s}\t{i % 2}" for i, s in enumerate(sentences)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture()
def sst2_files(tmp_path):
    # GLUE layout: a header, no quoting (a sentence may hold a bare quote), trailing spaces kept.
    # Row 39 repeats row 5's sentence: excluded too when row 5 is carved (same prompt, another id).
    train = [f'a {WORDS[i % 10]} "film" number {i} ' for i in range(39)] + ['a dull "film" number 5 ']
    dev = [f"the {WORDS[i]} ending {i} " for i in range(10)]
    tr, dv = _tsv(tmp_path / "train.tsv", train), _tsv(tmp_path / "dev.tsv", dev)
    suite = tmp_path / "sst2-small.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "sst2-small", "version": 1, "kind": "classification", "max_new_tokens": 4,
        "data": {"path": str(dv), "format": "sst2"},
        "split": {"method": "data", "seed": 0, "validation": {"path": str(tr), "carve": 8},
                  "test": {"path": str(dv)}}}))
    return tr, dv, suite


def test_carved_validation_and_train_side_exclusion_on_small_files(sst2_files):
    tr, dv, suite = sst2_files
    spec = load_suite(str(suite))
    val, rec = load_split(spec, "validation", None, load_items)
    test, _ = load_split(spec, "test", None, load_items)
    val_ids = {it.id for it in val.items}
    assert len(val_ids) == 8 == rec.n_validation and all(i.startswith("sst2/train/") for i in val_ids)
    assert [it.id for it in test.items] == [f"sst2/dev/{i}" for i in range(10)]  # test = the whole dev file
    assert val_ids == {it.id for it in load_split(spec, "validation", None, load_items)[0].items}  # deterministic
    bad = yaml.safe_load(suite.read_text())
    bad["split"]["validation"]["carve"] = 40
    (suite.parent / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SplitError, match="carve 40 needs more than 40 items"):
        load_split(load_suite(str(suite.parent / "bad.yaml")), "validation", None, load_items)

    records = load_training_records(str(tr), fmt="sst2")
    kept, record = exclude_held_out(records, [f"{spec.source}:validation"], str(tr))
    dup = "sst2/train/5" in val_ids or "sst2/train/39" in val_ids  # the repeated sentence, carved or not
    assert record["n_candidates"] == 40 and record["n_excluded"] == 8 + dup == 40 - len(kept)
    assert set(record["excluded_ids"]) >= val_ids
    for seed in (1, 2, 3):  # the seeded sample is drawn from the rest, so evaluate's check passes
        drawn = sample(kept, 24, seed, str(tr))
        assert not {r["id"] for r in drawn} & val_ids
        check_training_overlap([val], [("train run", training_items(drawn))])
    # the check itself still refuses a trained-on item (a train run without the exclusion)
    with pytest.raises(TrainingOverlapError, match="8 of its 8 items were trained on"):
        check_training_overlap([val], [("train run", training_items(records))])


def test_train_stage_excludes_a_suite_split_and_records_it(world, store, tmp_path, sst2_files, capsys):
    from sst_lab.train.sft import main

    tr, _, suite = sst2_files
    ref = f"{suite}:validation"
    argv = ["--config", "configs/models/tiny.yaml", "--dataset_name", str(tr), "--dataset_format", "sst2",
            "--study", "tests-held-out", "--tracking_uri", store, "--seed", "2", "--sample_size", "30",
            "--max_steps", "1", "--exclude_items_of", ref]
    assert main([*argv, "--output_dir", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    run = mlflow.MlflowClient(tracking_uri=store).get_run(out.split("run_id: ")[1].split()[0])
    adapter = Path(out.split("adapter: ")[1].split()[0])
    held = json.loads((adapter / HELD_OUT_FILE).read_text())
    val_ids = held_out_items([ref]).ids
    trained = {i["id"] for i in json.loads((adapter / "training_items.json").read_text())}
    assert len(trained) == 30 and not trained & val_ids and not trained & set(held["excluded_ids"])
    n_excl = run.data.metrics["train/n_excluded_held_out"]
    assert n_excl == held["n_excluded"] >= 8 and run.data.metrics["train/n_candidates"] == 40
    assert run.data.tags["train.exclude_items_of"] == ref and json.loads(run.data.params["train.exclude_items_of"]) == [ref]
    assert held["sources"][ref]["n_items"] == 8 and held["sources"][ref]["suite"] == "sst2-small@v1"

    # a missing suite (or its missing data file) fails the run, naming it
    with pytest.raises(ConfigError, match="exclude_items_of: 'no-such-suite:validation'.*unknown suite"):
        main([*argv[:-1], "no-such-suite:validation", "--output_dir", str(tmp_path / "x")])
    client = mlflow.MlflowClient(tracking_uri=store)
    last = client.search_runs([client.get_experiment_by_name("tests-held-out").experiment_id],
                              order_by=["attributes.start_time DESC"])[0]
    assert last.info.status == "FAILED" and "no-such-suite" in last.data.tags["error"]
    tr.unlink()
    with pytest.raises(ConfigError, match=f"exclude_items_of.*{tr}"):
        held_out_items([ref])
    with pytest.raises(ConfigError, match="exclude_items_of: 'sst2-heldout' must be '<suite"):
        main([*argv[:-1], "sst2-heldout", "--output_dir", str(tmp_path / "y")])


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="../shared/data not present")
def test_real_sst2_validation_is_carved_from_train_and_never_drawn(monkeypatch):
    """The shipped suite sst2-heldout and train config utility-sst2-heldout on the real files (no training)."""
    monkeypatch.chdir(REPO)
    cfg = yaml.safe_load((REPO / "configs/train/utility-sst2-heldout.yaml").read_text())
    spec = load_suite("sst2-heldout")
    val, rec = load_split(spec, "validation", None, load_items)
    test, _ = load_split(spec, "test", None, load_items)
    assert rec.n_validation == len(val.items) == 300 and all(i.id.startswith("sst2/train/") for i in val.items)
    assert [i.id for i in test.items] == [f"sst2/dev/{k}" for k in range(872)]  # the whole GLUE dev
    records = load_training_records(str(SHARED_DATA / "sst2/train.tsv"), fmt=cfg["dataset_format"])
    kept, record = exclude_held_out(records, cfg["exclude_items_of"], "sst2/train.tsv")
    assert record["n_candidates"] == 67349 and record["n_excluded"] >= 300
    val_ids, val_shas = {i.id for i in val.items}, {i.prompt_sha for i in val.items}
    for seed in (1, 2, 3):
        drawn = sample(kept, cfg["sample_size"], seed, "sst2/train.tsv")
        assert not {r["id"] for r in drawn} & val_ids and not {r["prompt_sha"] for r in drawn} & val_shas
        check_training_overlap([val], [(f"seed {seed}", training_items(drawn))])
