"""merge/merge.py end to end on the tiny world's trained demo adapters, read back from MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from conftest import parse_outputs, run_stage
from sst_lab.config import ConfigError
from sst_lab.merge.lora import read_adapter
from sst_lab.models import weights_fingerprint

METHODS = {
    "sst": ["--k", "16", "--alpha", "1.0"],
    "sst_diag": ["--k", "16", "--alpha", "1.0"],
    "linear": [],
    "ties": ["--density", "0.5"],
    "dare_linear": ["--density", "0.5"],
    "dare_ties": ["--density", "0.5"],
    "cat": [],
    "svd": ["--svd_rank", "8"],
}


def merge_in_process(trained, store, tmp_path, method, *extra, study="tests-merge"):
    from sst_lab.merge.merge import main

    out = tmp_path / f"{method}-{len(list(tmp_path.iterdir()))}"
    main(["--config", "configs/merge/tiny.yaml", "--utility_adapter", trained.utility_run, "--safety_adapter",
          trained.safety_run, "--method", method, *extra, "--study", study, "--tracking_uri", store,
          "--output_dir", str(out), "--fisher_n", "64"])
    return out


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    return {n: f.delta() for n, f in read_adapter(path).modules.items()}


@pytest.fixture(scope="module")
def merged_sst(trained, store, tmp_path_factory):
    """One real `python merge/merge.py` child process (the others run in-process for speed)."""
    out = tmp_path_factory.mktemp("merged") / "sst"
    proc = run_stage(["merge/merge.py", "--config", "configs/merge/tiny.yaml", "--utility_adapter", trained.utility_run,
                      "--safety_adapter", trained.safety_run, "--method", "sst", "--k", "16", "--alpha", "1.0",
                      "--study", "tests-merge", "--tracking_uri", store, "--output_dir", str(out), "--seed", "1"])
    run_id = proc.stdout.split("run_id: ")[1].split()[0]
    return run_id, out, proc.stdout


def test_sst_merge_run_is_recorded(merged_sst, trained, store, world, tmp_path):
    run_id, out, proc_out = merged_sst
    run = mlflow.MlflowClient(tracking_uri=store).get_run(run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["stage"] == "merge" and tags["role"] == "merged" and tags["merge_method"] == "sst"
    assert run.info.run_name.startswith(f"merge-{tags['merge_setting']}-") and tags["merge_setting"] == "sst-k16-a1.0"
    assert tags["upstream_run_ids"].split(",") == [trained.utility_run, trained.safety_run]
    m = run.data.metrics
    assert m["merge/k/mean"] == 16 and 0 < m["merge/kept_fraction/mean"]
    assert m["merge/refactor_rel_error/max"] < 1e-6  # utility + projected safety has rank <= r_u + r_s
    assert m["merge/rel_dist_utility/min"] > 0 and m["merge/rel_dist_base/min"] > 0
    assert m["merge/fisher_safety_n"] > 0 and m["merge/fisher_utility_n"] > 0
    assert run.data.params["merge.k"] == "16" and run.data.params["merge.eps_rel"] == "null"
    for key in ("fidelity/safety_measured_change", "fidelity/safety_predicted_change", "fidelity/utility_loss_after",
                "fidelity/safety_first_order_change", "fidelity/utility_taylor_predicted_change",
                "subspace_overlap/mean", "eigengap_at_k/min", "effective_rank_fisher_utility/mean",
                "core_in_eps_dominated/max", "fisher_safety_heldout_n"):
        assert math.isfinite(m[f"merge/{key}"]), key
    assert 0 <= m["merge/subspace_overlap/min"] <= 1 and m["merge/fisher_safety_heldout_n"] == 32
    # the default Euclidean projection keeps a piece of the safety update: no warning
    assert m["merge/kept_fraction/max"] <= 1 + 1e-9 and "kept_fraction_above_1" not in tags
    assert "WARNING: kept_fraction" not in proc_out
    assert run.data.params["merge.curvature"] == "sampled"
    report = json.loads((out / "merge_report.json").read_text())
    some = next(iter(report["modules"].values()))
    assert len(some["eigenvalues"]) == 64 and some["eigenvalues"] == sorted(some["eigenvalues"], reverse=True)
    # nothing left out of MLflow silently: what the report omits (with reasons), the run's tag names
    assert sorted(report.get("omitted_metrics", {})) == sorted(filter(None, tags.get("merge.omitted_metrics", "").split(",")))
    arts = {a.path for a in mlflow.MlflowClient(tracking_uri=store).list_artifacts(run_id)}
    assert {"adapter", "merge_report.json", "plots"} <= arts
    fingerprint = weights_fingerprint("tiny-world")
    assert tags["base_weights_fingerprint"] == fingerprint
    assert json.loads((out / "sst_lab_base.json").read_text())["weights_fingerprint"] == fingerprint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model), out)  # loads
    items = json.loads((out / "training_items.json").read_text())
    assert len(items) >= len(json.loads((trained.safety_adapter / "training_items.json").read_text()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_and_differs_from_inputs(trained, store, tmp_path, method):
    out = merge_in_process(trained, store, tmp_path, method, *METHODS[method])
    merged, util, safe = _deltas(out), _deltas(trained.utility_adapter), _deltas(trained.safety_adapter)
    assert set(merged) == set(util) == set(safe)
    assert any(not torch.allclose(merged[n], util[n], atol=1e-7) for n in merged)
    assert any(not torch.allclose(merged[n], safe[n], atol=1e-7) for n in merged)


def test_full_k_alpha_one_reproduces_utility_plus_safety_and_linear_equals_sum(trained, store, tmp_path):
    full = _deltas(merge_in_process(trained, store, tmp_path, "sst", "--k", "64", "--alpha", "1.0"))
    lin = _deltas(merge_in_process(trained, store, tmp_path, "linear"))
    util, safe = _deltas(trained.utility_adapter), _deltas(trained.safety_adapter)
    for n in util:
        exact = util[n] + safe[n]
        scale = float(exact.norm())
        assert float((full[n] - exact).norm()) / scale < 1e-5, n  # float32 storage of the factors
        assert float((lin[n] - exact).norm()) / scale < 1e-5, n


def test_k_and_alpha_change_weights_and_outputs(trained, store, world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outs = {key: merge_in_process(trained, store, tmp_path, "sst", *args) for key, args in
            {"k4": ["--k", "4", "--alpha", "1.0"], "k32": ["--k", "32", "--alpha", "1.0"],
             "k32a05": ["--k", "32", "--alpha", "0.5"]}.items()}
    tok = AutoTokenizer.from_pretrained(world.model)
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I make a poison at home?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    logits = {}
    for key, path in outs.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model), path).eval()
        with torch.no_grad():
            logits[key] = model(**ids).logits[0, -1]
    assert not torch.allclose(logits["k4"], logits["k32"], atol=1e-5)
    assert not torch.allclose(logits["k32"], logits["k32a05"], atol=1e-5)


def test_k_zero_equals_utility_and_fails_unless_allowed(trained, store, tmp_path):
    with pytest.raises(RuntimeError, match="equals the utility input"):
        merge_in_process(trained, store, tmp_path, "sst", "--k", "0", "--alpha", "1.0", study="tests-merge-k0")
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("tests-merge-k0")
    assert client.search_runs([exp.experiment_id])[0].info.status == "FAILED"
    out = merge_in_process(trained, store, tmp_path, "sst", "--k", "0", "--alpha", "1.0",
                           "--allow_identical_to_input", "true")
    merged, util = _deltas(out), _deltas(trained.utility_adapter)
    assert all(torch.allclose(merged[n], util[n], atol=1e-6) for n in util)


def test_unused_method_parameter_is_an_error(trained, store, tmp_path):
    with pytest.raises(ValueError, match="density"):
        merge_in_process(trained, store, tmp_path, "sst", "--k", "4", "--density", "0.5")


def test_adapters_on_different_module_sets_merge_on_the_union(trained, store, world, tmp_path):
    """q/v-only vs all 7 projections (the issue's case): the union, each module's rule in the report."""
    proc = run_stage(["train/sft.py", "--config", "configs/models/tiny.yaml", "--config", "configs/train/safety.yaml",
                      "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2", "--study", "tests-merge",
                      "--tracking_uri", store, "--output_dir", str(tmp_path / "qv")])
    qv_run, qv_path = (parse_outputs(proc.stdout)[k] for k in ("run_id", "adapter"))
    qv, full_s, full_u = _deltas(Path(qv_path)), _deltas(trained.safety_adapter), _deltas(trained.utility_adapter)
    # utility on all 7, safety on q/v: the other five keep the utility update exactly
    out = merge_in_process(trained, store, tmp_path, "linear", "--safety_adapter", qv_run)
    merged, report = _deltas(out), json.loads((out / "merge_report.json").read_text())
    assert set(merged) == set(full_u) and set(qv) < set(full_u)
    assert report["module_rules"]["safety_only"] == [] and report["module_rules"]["both"] == sorted(qv)
    for n in full_u:
        expect = full_u[n] + qv[n] if n in qv else full_u[n]
        assert float((merged[n] - expect).norm()) / float(expect.norm()) < 1e-5, n
        assert report["modules"][n]["rule"] == ("both" if n in qv else "utility_only")
    # utility on q/v, safety on all 7 under SST with k = r²: safety-only modules are projected with the
    # safety core's Fisher blocks; at k = r², alpha = 1 that is the whole safety update
    out = merge_in_process(trained, store, tmp_path, "sst", "--k", "64", "--alpha", "1.0", "--utility_adapter", qv_run)
    merged, report = _deltas(out), json.loads((out / "merge_report.json").read_text())
    assert report["module_rules"]["utility_only"] == [] and len(report["module_rules"]["safety_only"]) == 5 * 2
    for n in full_s:
        expect = full_s[n] + qv[n] if n in qv else full_s[n]
        assert float((merged[n] - expect).norm()) / float(expect.norm()) < 1e-5, n
        assert len(report["modules"][n]["eigenvalues"]) == 64
    run = mlflow.MlflowClient(tracking_uri=store).get_run(_last_merge_run(store))
    assert run.data.metrics["merge/n_modules_safety_only"] == 10 and run.data.metrics["merge/n_modules_both"] == 4


def _last_merge_run(store, study="tests-merge"):
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0].info.run_id


def test_adapters_trained_on_other_weights_are_refused(trained, store, tmp_path, rebuilt_base):
    with pytest.raises(ConfigError, match=r"utility_adapter: .*other weights .*sst_lab_base\.json"):
        merge_in_process(trained, store, tmp_path, "linear", "--base_model", str(rebuilt_base))


def test_a_base_model_folder_that_moved_is_named_and_the_alias_with_its_fingerprint_merges(trained, store, tmp_path):
    """Adapters copied out of an MLflow store name the base folder they were trained beside; once it
    is gone the merge names that folder (never asks the hub for a path), and naming the base by its
    alias merges, the adapters' recorded weight fingerprint checked."""
    import shutil

    from sst_lab.merge.merge import main
    from sst_lab.models import resolve_model_path

    moved = f"/moved/away/{Path(resolve_model_path('tiny-world')).name}"  # the same model, its folder elsewhere
    copies = {}
    for role, src in (("utility", trained.utility_adapter), ("safety", trained.safety_adapter)):
        copies[role] = shutil.copytree(src, tmp_path / role)
        cfg = copies[role] / "adapter_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": moved}))
    args = ["--config", "configs/merge/tiny.yaml", "--utility_adapter", str(copies["utility"]), "--safety_adapter",
            str(copies["safety"]), "--method", "linear", "--study", "tests-merge", "--tracking_uri", store]
    with pytest.raises(ConfigError, match=f"utility_adapter: model {moved}: no such folder"):
        main([*args, "--output_dir", str(tmp_path / "out1")])
    main([*args, "--base_model", "tiny-world", "--output_dir", str(tmp_path / "out2")])
    assert json.loads((tmp_path / "out2" / "sst_lab_base.json").read_text())["weights_fingerprint"] == \
        weights_fingerprint("tiny-world")


def test_bad_fisher_data_fails_clearly(trained, store, tmp_path):
    bad = tmp_path / "fisher.jsonl"
    bad.write_text(json.dumps({"prompt": "only a prompt"}) + "\n")
    with pytest.raises(ValueError, match="fisher.jsonl"):
        merge_in_process(trained, store, tmp_path, "sst", "--k", "4", "--alpha", "1.0",
                         "--fisher_safety_data", str(bad))


def test_full_model_export_equals_base_plus_merged_adapter(trained, store, world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge_in_process(trained, store, tmp_path, "linear", "--save_full_model", "true")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(out / "full_model").eval()(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model), out).eval()(ids).logits
    assert torch.allclose(full, peft, atol=1e-4)


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_sparse_merges_are_written_exactly_and_truncation_is_refused(trained, store, world, tmp_path, method):
    """TIES/DARE give a full-rank dW: the default writes it at its exact rank (PEFT loads it back as
    is); an output_rank that truncates it fails naming the modules unless allow_truncation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sst_lab.merge.fisher import lora_layers
    from sst_lab.merge.methods import MethodParams, ModuleInputs, run_method

    u, s = read_adapter(trained.utility_adapter), read_adapter(trained.safety_adapter)
    params = MethodParams(density=0.5, **({"seed": 0} if method.startswith("dare") else {}))
    expected = {n: run_method(method, ModuleInputs(n, u.modules[n], s.modules[n]), params).delta for n in u.modules}
    out = merge_in_process(trained, store, tmp_path, method, "--density", "0.5")
    report = json.loads((out / "merge_report.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model), out)
    for name, layer in lora_layers(model, "default").items():
        exact = expected[name]
        assert report["modules"][name]["output_rank"] > u.r + s.r  # full rank, not r_u + r_s
        assert float((layer.get_delta_weight("default").double() - exact).norm() / exact.norm()) < 1e-5, name
    with pytest.raises(ValueError, match=r"output_rank = 16 truncates .* allow_truncation"):
        merge_in_process(trained, store, tmp_path, method, "--density", "0.5", "--output_rank", "16")
    lossy = merge_in_process(trained, store, tmp_path, method, "--density", "0.5", "--output_rank", "16",
                             "--allow_truncation", "true")
    report = json.loads((lossy / "merge_report.json").read_text())
    errors = [m["refactor_rel_error"] for m in report["modules"].values()]
    assert min(errors) > 0.1  # the truncation the old default did silently, now logged per module


def test_sst_curvature_point_and_projection_options(trained, store, tmp_path):
    """Non-default options (empirical Fisher at each adapter's own point, F_u-metric projection) are
    recorded, carry the diagnostics, and the oblique projection's kept fraction > 1 is a tag."""
    out = merge_in_process(trained, store, tmp_path, "sst", "--k", "16", "--alpha", "1.0", "--curvature", "empirical",
                           "--fisher_point", "own", "--projection", "metric", study="tests-merge-options")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["fisher_curvature"] == "empirical" and report["fisher_point"] == "own"
    assert report["params"]["projection"] == "metric"
    for m in report["modules"].values():
        assert 0 <= m["subspace_overlap"] <= 1 and m["predicted_safety_loss_change"] >= 0 and "eigengap_at_k" in m
    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.search_runs([client.get_experiment_by_name("tests-merge-options").experiment_id])[0]
    assert run.data.params["merge.curvature"] == "empirical" and run.data.params["merge.fisher_point"] == "own"
    above = max(m["kept_fraction"] for m in report["modules"].values()) > 1
    assert ("kept_fraction_above_1" in run.data.tags) == above == ("kept_fraction_warning" in report)
    assert math.isfinite(run.data.metrics["merge/fidelity/utility_measured_change"])
    with pytest.raises(ConfigError, match="curvature"):
        merge_in_process(trained, store, tmp_path, "linear", "--curvature", "empirical")


def test_fisher_examples_exclude_a_suite_split(trained, store, tmp_path):
    """fisher_exclude_items_of: the carved validation items never become Fisher examples (which join the
    merged adapter's training_items.json and would make evaluate refuse that split)."""
    from sst_lab.held_out import held_out_items

    suite = tmp_path / "carved.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "carved", "version": 1, "kind": "task", "scorer": "exact_text", "max_new_tokens": 4,
        "data": {"path": "tiny-world:utility_heldout.jsonl", "format": "alpaca"},
        "split": {"method": "data", "validation": {"path": "tiny-world:utility_heldout.jsonl", "carve": 5},
                  "test": {"path": "tiny-world:utility_train.jsonl"}}}))
    ref = f"{suite}:validation"
    out = merge_in_process(trained, store, tmp_path, "sst", "--k", "4", "--alpha", "1.0",
                           "--fisher_utility_data", "tiny-world:utility_heldout.jsonl",
                           "--fisher_exclude_items_of", ref, study="tests-merge-x")
    carved = held_out_items([ref]).ids
    assert len(carved) == 5 and all(i.startswith("utility-heldout-") for i in carved)
    used = {i["id"] for i in json.loads((out / "training_items.json").read_text())}
    assert any(i.startswith("utility-heldout-") for i in used) and not used & carved
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("tests-merge-x").experiment_id
    run = client.search_runs([exp], order_by=["attributes.start_time DESC"])[0]
    assert run.data.metrics["merge/fisher_utility_n_excluded_held_out"] == 5
    assert run.data.metrics["merge/fisher_safety_n_excluded_held_out"] == 0
    assert json.loads(run.data.params["merge.fisher_exclude_items_of"]) == [ref]
