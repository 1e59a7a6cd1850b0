"""Merge math: GEVP solver, projection, methods, registry, adapter IO and per-example core grads.

Tiny random Llama models built in fixtures; LoRA B factors randomised (B starts at zero, which
would make every core gradient vanish).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg
import torch

from sst_lab.merge import fisher, methods, sst
from sst_lab.merge.lora import (
    AdapterMismatchError, AdapterWeights, LoraFactors, plan_merge, read_adapter, refactorise, write_adapter,
    zero_factors)
from sst_lab.merge.methods import MethodParams, ModuleInputs, run_method

R_U, R_S = 3, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_fisher(n_examples: int, r: int, gen: torch.Generator) -> torch.Tensor:
    G = torch.randn(n_examples, r * r, generator=gen, dtype=torch.float64)
    G = G * torch.linspace(0.2, 2.0, r * r, dtype=torch.float64)  # anisotropic
    return G.T @ G / n_examples


def random_factors(r: int, out: int, inp: int, scale: float, gen: torch.Generator) -> LoraFactors:
    return LoraFactors(torch.randn(r, inp, generator=gen, dtype=torch.float64),
                       torch.randn(out, r, generator=gen, dtype=torch.float64), scale)


@pytest.fixture
def module_inputs() -> ModuleInputs:
    gen = torch.Generator().manual_seed(0)
    return ModuleInputs(
        name="model.layers.0.self_attn.q_proj",
        utility=random_factors(R_U, 12, 10, 2.0, gen), safety=random_factors(R_S, 12, 10, 0.5, gen),
        fisher_s=random_fisher(40, R_S, gen), fisher_u=random_fisher(30, R_S, gen))


# ------------------------------------------------------------------ GEVP and projection


def test_solver_matches_scipy() -> None:
    gen = torch.Generator().manual_seed(1)
    for r, n_s, n_u in [(4, 40, 30), (4, 40, 6), (5, 60, 60)]:  # includes a singular F_u (6 < 16)
        F_s, F_u = random_fisher(n_s, r, gen), random_fisher(n_u, r, gen)
        gevp = sst.solve_gevp(F_s, F_u, 1e-3)
        assert gevp.eps == pytest.approx(1e-3 * float(torch.trace(F_u)) / r**2)
        P = F_u.numpy() + gevp.eps * np.eye(r * r)
        lam, V = scipy.linalg.eigh(F_s.numpy(), P)
        lam, V = lam[::-1], V[:, ::-1]
        np.testing.assert_allclose(gevp.eigenvalues.numpy(), lam, rtol=1e-5, atol=1e-9 * lam[0])
        m = np.eye(r).reshape(-1)
        for k in (1, 5, r * r // 2):
            expected = V[:, :k] @ (V[:, :k].T @ (P @ m))
            M, _ = sst.project_core(gevp, k, r)
            assert rel(M.reshape(-1), torch.from_numpy(expected.copy())) < 1e-5
        VtPV = gevp.V.T @ torch.from_numpy(P) @ gevp.V
        assert rel(VtPV, torch.eye(r * r, dtype=torch.float64)) < 1e-8


def test_full_k_alpha_one_is_exact_sum(module_inputs: ModuleInputs) -> None:
    expected = module_inputs.utility.delta() + module_inputs.safety.delta()
    result = run_method("sst", module_inputs, MethodParams(k=R_S**2))
    assert rel(result.delta, expected) < 1e-10
    assert result.stats["kept_fraction"] == pytest.approx(1.0, abs=1e-10)
    assert result.stats["metric_kept_fraction"] == pytest.approx(1.0, abs=1e-10)
    # also with a singular utility Fisher (fewer examples than r^2): eps makes it solvable, k = r^2 exact
    singular = replace(module_inputs, fisher_u=random_fisher(5, R_S, torch.Generator().manual_seed(3)))
    assert rel(run_method("sst", singular, MethodParams(k=R_S**2)).delta, expected) < 1e-10


def test_k_and_alpha_change_the_merge(module_inputs: ModuleInputs) -> None:
    du = module_inputs.utility.delta()
    deltas = {k: run_method("sst", module_inputs, MethodParams(k=k)).delta for k in (0, 2, 8, R_S**2)}
    assert torch.equal(deltas[0], du)  # k = 0: utility only
    for a, b in [(2, 8), (8, R_S**2), (2, R_S**2)]:
        assert rel(deltas[a], deltas[b]) > 1e-3
    half = run_method("sst", module_inputs, MethodParams(k=8, alpha=0.5)).delta
    assert rel(half - du, 0.5 * (deltas[8] - du)) < 1e-12
    assert rel(half, deltas[8]) > 1e-3


def test_project_core_metric_fraction_is_monotone(module_inputs: ModuleInputs) -> None:
    gevp = sst.solve_gevp(module_inputs.fisher_s, module_inputs.fisher_u, 1e-3)
    kept = [sst.project_core(gevp, k, R_S)[1] for k in range(R_S**2 + 1)]
    assert kept[0] == 0.0 and kept[-1] == pytest.approx(1.0)
    assert all(b >= a - 1e-12 for a, b in zip(kept, kept[1:], strict=False))


def test_nan_fisher_names_module(module_inputs: ModuleInputs) -> None:
    bad = module_inputs.fisher_s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="q_proj.*NaN"):
        run_method("sst", replace(module_inputs, fisher_s=bad), MethodParams(k=4))


def test_missing_fisher_names_module(module_inputs: ModuleInputs) -> None:
    with pytest.raises(ValueError, match=r"q_proj.*fisher_u"):
        run_method("sst", replace(module_inputs, fisher_u=None), MethodParams(k=4))
    with pytest.raises(ValueError, match=r"q_proj"):
        run_method("sst_diag", replace(module_inputs, fisher_s=None), MethodParams(k=4))


def test_sst_diag(module_inputs: ModuleInputs) -> None:
    full = run_method("sst_diag", module_inputs, MethodParams(k=R_S**2)).delta
    assert rel(full, module_inputs.utility.delta() + module_inputs.safety.delta()) < 1e-12
    assert torch.equal(run_method("sst_diag", module_inputs, MethodParams(k=0)).delta, module_inputs.utility.delta())
    # a Fisher whose ratio ranks the core entry (1, 1) first keeps exactly that diagonal entry
    d_s = torch.full((R_S**2,), 1e-3, dtype=torch.float64)
    d_s[1 * R_S + 1] = 1.0
    diag = replace(module_inputs, fisher_s=d_s, fisher_u=torch.ones(R_S**2, dtype=torch.float64))
    res = run_method("sst_diag", diag, MethodParams(k=1))
    M = torch.zeros(R_S, R_S, dtype=torch.float64)
    M[1, 1] = 1.0
    assert rel(res.delta, module_inputs.utility.delta() + sst.core_delta(module_inputs.safety, M)) < 1e-12
    assert res.stats["diagonal_entries_kept"] == 1


def test_global_k_budget() -> None:
    spectra = {"b": torch.tensor([5.0, 1.0, 0.5]), "a": torch.tensor([4.0, 3.0, 0.1])}
    assert sst.global_k_budget(spectra, 3) == {"b": 1, "a": 2}
    assert sst.global_k_budget(spectra, 0) == {"b": 0, "a": 0}
    assert sst.global_k_budget(spectra, 6) == {"b": 3, "a": 3}
    with pytest.raises(ValueError, match="k_total"):
        sst.global_k_budget(spectra, 7)


# ------------------------------------------------------------------ other methods


def test_linear_is_exact_sum(module_inputs: ModuleInputs) -> None:
    du, ds = module_inputs.utility.delta(), module_inputs.safety.delta()
    assert rel(run_method("linear", module_inputs, MethodParams()).delta, du + ds) < 1e-15
    weighted = run_method("linear", module_inputs, MethodParams(weights=[0.3, 2.0])).delta
    assert rel(weighted, 0.3 * du + 2.0 * ds) < 1e-15


def test_cat_equals_linear(module_inputs: ModuleInputs) -> None:
    params = MethodParams(weights=(0.7, 1.5))
    res = run_method("cat", module_inputs, params)
    assert rel(res.delta, run_method("linear", module_inputs, params).delta) < 1e-12
    assert res.stats["rank"] == R_U + R_S


def test_svd_truncates(module_inputs: ModuleInputs) -> None:
    exact = run_method("linear", module_inputs, MethodParams()).delta
    assert rel(run_method("svd", module_inputs, MethodParams(rank=R_U + R_S)).delta, exact) < 1e-12
    res = run_method("svd", module_inputs, MethodParams(rank=2))
    assert int(torch.linalg.matrix_rank(res.delta)) == 2
    assert rel(res.delta, exact) == pytest.approx(res.stats["rel_error"], rel=1e-9)


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties"])
def test_sparse_methods_deterministic_by_seed(module_inputs: ModuleInputs, name: str) -> None:
    base = MethodParams(density=0.5) if name == "ties" else MethodParams(density=0.5, seed=7)
    a = run_method(name, module_inputs, base).delta
    assert torch.equal(a, run_method(name, module_inputs, base).delta)
    if name != "ties":
        assert not torch.equal(a, run_method(name, module_inputs, replace(base, seed=8)).delta)
    with pytest.raises(ValueError, match="density"):
        run_method(name, module_inputs, MethodParams())


def test_dare_and_ties_definitions(module_inputs: ModuleInputs) -> None:
    du, ds = module_inputs.utility.delta(), module_inputs.safety.delta()
    # density 1: DARE drops nothing -> linear
    assert rel(run_method("dare_linear", module_inputs, MethodParams(density=1.0)).delta, du + ds) < 1e-15
    # density 1 TIES: where signs agree the mean, elsewhere the entry with the larger magnitude
    t = run_method("ties", module_inputs, MethodParams(density=1.0)).delta
    agree = torch.sign(du) == torch.sign(ds)
    assert torch.allclose(t[agree], ((du + ds) / 2)[agree])
    bigger = torch.where(du.abs() > ds.abs(), du, ds)
    assert torch.allclose(t[~agree], bigger[~agree])
    # DARE keeps about `density` of the entries, rescaled
    d = run_method("dare_linear", module_inputs, MethodParams(density=0.5, weights=(1.0, 0.0))).delta
    kept = d != 0
    assert torch.allclose(d[kept], 2 * du[kept])
    assert 0.3 < float(kept.double().mean()) < 0.7


def test_registry_errors(module_inputs: ModuleInputs) -> None:
    with pytest.raises(ValueError, match="already registered"):
        methods.merge_method("linear")(lambda module, *, params: None)
    with pytest.raises(ValueError, match=r"did you mean 'ties'.*Known methods"):
        methods.get_method("tie")
    with pytest.raises(ValueError, match=r"does not use \['k'\]"):
        run_method("linear", module_inputs, MethodParams(k=3))
    with pytest.raises(ValueError, match=r"does not use \['weights'\]"):
        run_method("sst", module_inputs, MethodParams(k=3, weights=(1.0, 0.5)))
    with pytest.raises(ValueError, match="needs MethodParams.k"):
        run_method("sst", module_inputs, MethodParams())
    with pytest.raises(ValueError, match="density"):
        MethodParams(density=1.5)
    assert {"linear", "ties", "dare_linear", "dare_ties", "cat", "svd", "sst", "sst_diag"} <= set(
        methods.available_methods())


# ------------------------------------------------------------------ adapter IO and plans


def _weights(names: list[str], base: str = "tiny", r: int = 2, shape=(6, 5)) -> AdapterWeights:
    gen = torch.Generator().manual_seed(0)
    mods = {n: random_factors(r, shape[0], shape[1], 1.0, gen) for n in names}
    return AdapterWeights(path=f"/adapters/{base}-{r}", modules=mods, base_model_name_or_path=base, r=r,
                          alpha=r, target_modules=None, config={})


def test_plan_matches_by_name_and_lists_mismatches() -> None:
    u = _weights(["m.a", "m.b", "m.c"])
    s = _weights(["m.c", "m.b", "m.a"], r=4)  # other order, other rank
    plan = plan_merge(u, s)
    assert plan.names == ["m.a", "m.b", "m.c"]
    assert all(p.rank_utility == 2 and p.rank_safety == 4 for p in plan.pairs)
    # different module sets: the union, each module with its rule
    union = plan_merge(_weights(["m.a", "m.b"]), _weights(["m.b", "m.z"], r=4))
    assert union.names == ["m.a", "m.b", "m.z"]
    assert union.rules() == {"both": ["m.b"], "utility_only": ["m.a"], "safety_only": ["m.z"]}
    assert [(p.rank_utility, p.rank_safety) for p in union.pairs] == [(2, 0), (2, 4), (0, 4)]
    with pytest.raises(AdapterMismatchError, match=r"'tiny'.*'other'"):
        plan_merge(_weights(["m.a"]), _weights(["m.a"], base="other"))
    with pytest.raises(AdapterMismatchError, match=r"m.a: utility \(6, 5\) vs safety \(7, 5\)"):
        plan_merge(_weights(["m.a"]), _weights(["m.a"], shape=(7, 5)))
    # a real mismatch names the adapters as the stage labels them (run ids), not a download folder
    with pytest.raises(AdapterMismatchError, match=r"safety_adapter \(train run 0123abcd.*\) on 'other'") as err:
        plan_merge(_weights(["m.a"]), _weights(["m.a"], base="other"),
                   utility_label="utility_adapter (train run 4567cdef, artifact 'adapter')",
                   safety_label="safety_adapter (train run 0123abcd, artifact 'adapter')")
    assert "/adapters/" not in str(err.value)


def test_a_module_in_one_adapter_only_follows_the_declared_rule() -> None:
    """The absent adapter's update is zero there: SST on a safety-only module projects the safety update
    with the Fisher blocks of the safety core (both exist: they are the safety core's, on safety and on
    utility data), so k = r² keeps it whole, k = 0 drops it, alpha scales it."""
    gen = torch.Generator().manual_seed(11)
    r = 3
    fs = random_factors(r, 7, 6, 0.5, gen)
    zero = zero_factors(fs.shape)
    F_s, F_u = random_fisher(40, r, gen), random_fisher(40, r, gen)
    only_s = ModuleInputs("m.z", zero, fs, F_s, F_u)
    assert rel(run_method("sst", only_s, MethodParams(k=r * r, alpha=1.0)).delta, fs.delta()) < 1e-9
    assert float(run_method("sst", only_s, MethodParams(k=0, alpha=1.0)).delta.abs().max()) == 0.0
    half = run_method("sst", only_s, MethodParams(k=2, alpha=0.5)).delta
    assert rel(run_method("sst", only_s, MethodParams(k=2, alpha=1.0)).delta, 2 * half) < 1e-12
    # linear with weights (w_u, w_s): the one adapter's update, weighted
    lin = run_method("linear", only_s, MethodParams(weights=(1.0, 0.7))).delta
    assert rel(lin, 0.7 * fs.delta()) < 1e-12


def test_refactorise() -> None:
    gen = torch.Generator().manual_seed(5)
    delta = random_factors(3, 9, 7, 1.0, gen).delta()
    A, B, err = refactorise(delta, 3)
    assert err < 1e-12 and rel(B @ A, delta) < 1e-12
    A, B, err = refactorise(delta, 2)
    assert err == pytest.approx(rel(B @ A, delta), rel=1e-9) and err > 0.01
    with pytest.raises(ValueError, match="rank"):
        refactorise(delta, 8)


# ------------------------------------------------------------------ tiny Llama fixtures

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_config():
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(tiny_config()).save_pretrained(path)
    return path


def load_base(base_dir):
    return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def make_adapter(base_dir, out, *, seed: int, r: int, alpha: float, **extra):
    model = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.1, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return (make_adapter(base_dir, root / "utility", seed=1, r=R_U, alpha=6),
            make_adapter(base_dir, root / "safety", seed=2, r=R_S, alpha=8))


@pytest.fixture
def both_model(base_dir, adapters):
    model = peft.PeftModel.from_pretrained(load_base(base_dir), adapters[0], adapter_name="utility")
    model.load_adapter(adapters[1], adapter_name="safety")
    fisher.activate_adapters(model, ["utility", "safety"])
    return model


def test_read_adapter_scales_match_peft(base_dir, tmp_path) -> None:
    path = make_adapter(base_dir, tmp_path / "patterned", seed=3, r=4, alpha=8,
                        rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})
    w = read_adapter(path)
    model = peft.PeftModel.from_pretrained(load_base(base_dir), path)
    layers = fisher.lora_layers(model, "default")
    assert list(w.modules) == sorted(layers) and len(w.modules) == 2 * len(TARGETS)
    for name, layer in layers.items():
        f = w.modules[name]
        assert f.scale == pytest.approx(layer.scaling["default"])
        assert rel(f.delta(torch.float32), layer.get_delta_weight("default")) < 1e-6
    assert w.modules["model.layers.0.self_attn.q_proj"].rank == 2
    rs = read_adapter(make_adapter(base_dir, tmp_path / "rs", seed=3, r=4, alpha=8, use_rslora=True))
    assert rs.modules["model.layers.1.mlp.up_proj"].scale == pytest.approx(8 / 2)


def test_read_adapter_errors(adapters, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_adapter(tmp_path / "nowhere")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_adapter(tmp_path / "a")
    cfg = json.loads((adapters[0] / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        read_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": None}))
    with pytest.raises(ValueError, match="lora_alpha"):
        read_adapter(tmp_path / "a")


def test_write_adapter_round_trip(base_dir, adapters, tmp_path) -> None:
    u, s = read_adapter(adapters[0]), read_adapter(adapters[1])
    plan = plan_merge(u, s)
    rank = R_U + R_S
    merged, factors = {}, {}
    for pair in plan.pairs:
        inputs = ModuleInputs(pair.name, u.modules[pair.name], s.modules[pair.name])
        merged[pair.name] = run_method("cat", inputs, MethodParams()).delta
        A, B, err = refactorise(merged[pair.name], rank)
        assert err < 1e-6
        factors[pair.name] = (A, B)
    out = write_adapter(tmp_path / "merged", factors, base_model_name_or_path=u.base_model_name_or_path,
                        rank=rank, template_config=u.config)
    model = peft.PeftModel.from_pretrained(load_base(base_dir), out)
    layers = fisher.lora_layers(model, "default")
    assert sorted(layers) == plan.names
    for name, layer in layers.items():
        assert rel(layer.get_delta_weight("default"), merged[name]) < 1e-5
    assert read_adapter(out).modules.keys() == merged.keys()
    with pytest.raises(FileExistsError):
        write_adapter(out, factors, base_model_name_or_path=None, rank=rank, template_config=u.config)


# ------------------------------------------------------------------ per-example core gradients


def make_batch(lengths: list[int], T: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    N = len(lengths)
    ids = torch.randint(0, 128, (N, T), generator=gen)
    mask = torch.zeros(N, T, dtype=torch.long)
    labels = ids.clone()
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        labels[i, n:] = -100
        labels[i, : n // 2] = -100  # prompt tokens carry no loss
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def naive_core_grads(model, batch: dict, adapter: str, core: float = 1.0) -> dict[str, torch.Tensor]:
    """One example at a time, unpadded, with an explicit core parameter M = core * I per module."""
    layers = fisher.lora_layers(model, adapter)
    out = {name: [] for name in layers}
    model.eval()
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        cores = {name: (core * torch.eye(layer.lora_A[adapter].out_features)).requires_grad_(True)
                 for name, layer in layers.items()}
        handles = [layer.lora_A[adapter].register_forward_hook(lambda m, a, o, M=cores[name]: o @ M.T)
                   for name, layer in layers.items()]
        try:
            ids = batch["input_ids"][i: i + 1, :n]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            loss = fisher.per_example_loss(logits, batch["labels"][i: i + 1, :n], torch.ones_like(ids))[0]
            grads = torch.autograd.grad(loss, list(cores.values()))
        finally:
            for h in handles:
                h.remove()
        for name, g in zip(cores, grads, strict=True):
            out[name].append(g)
    return {name: torch.stack(gs) for name, gs in out.items()}


def test_per_example_grads_match_naive_loop(both_model) -> None:
    batch = make_batch([12, 7, 16, 9], T=16)
    both_model.train()  # lora_dropout = 0.1: the function must switch to eval itself
    fast = fisher.per_example_core_grads(both_model, batch, "safety")
    assert both_model.training
    slow = naive_core_grads(both_model, batch, "safety")
    assert sorted(fast) == sorted(slow) == sorted(read_adapter_names(both_model))
    for name in slow:
        assert fast[name].shape == (4, R_S, R_S)
        assert rel(fast[name], slow[name]) < 1e-5, name
    assert all(p.grad is None for p in both_model.parameters())
    # left padding with position_ids gives the same per-example gradients
    T = batch["input_ids"].shape[1]
    left = {k: torch.full_like(v, -100 if k == "labels" else 0) for k, v in batch.items()}
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for k in batch:
            left[k][i, T - n:] = batch[k][i, :n]
    left["position_ids"] = (left["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    left_grads = fisher.per_example_core_grads(both_model, left, "safety")
    for name in slow:
        assert rel(left_grads[name], slow[name]) < 1e-5, name


def read_adapter_names(model) -> list[str]:
    return list(fisher.lora_layers(model, "safety"))


def test_fisher_blocks_and_diag(both_model) -> None:
    batches = [make_batch([10, 8], T=10, seed=1), make_batch([6, 9, 10], T=10, seed=2)]
    blocks = fisher.fisher_blocks(both_model, batches, "safety")
    diag = fisher.fisher_diag(both_model, batches, "safety")
    grads = [fisher.per_example_core_grads(both_model, b, "safety") for b in batches]
    for name, F in blocks.items():
        vec = torch.cat([g[name] for g in grads]).reshape(5, -1).double()
        assert F.shape == (R_S**2, R_S**2) and F.dtype == torch.float64
        assert rel(F, vec.T @ vec / 5) < 1e-6
        assert rel(diag[name], F.diagonal()) < 1e-6


def test_first_order_term_is_the_held_out_loss_gradient(both_model) -> None:
    """``first_order_change(heldout_core_gradient(...))`` along a step equals the central difference of
    ``heldout_loss`` along the safety cores ``I + eps D`` (the loss is float32: eps 1e-2 keeps its rounding
    below the tolerance; the central difference's own error is O(eps^2))."""
    from sst_lab.merge.diagnostics import (first_order_change, heldout_core_gradient, heldout_loss,
                                           restore_safety_b, set_safety_cores)

    model = both_model
    batches = [make_batch([10, 8], T=10, seed=3), make_batch([6, 9, 10], T=10, seed=4)]
    g = heldout_core_gradient(model, batches)
    names = read_adapter_names(model)
    assert sorted(g) == sorted(names) and all(v.shape == (R_S, R_S) for v in g.values())
    gen = torch.Generator().manual_seed(5)
    eye = torch.eye(R_S, dtype=torch.float64)
    D = {n: torch.randn(R_S, R_S, generator=gen, dtype=torch.float64) for n in names}
    eps = 1e-2

    def loss_at(sign: float) -> float:
        saved = set_safety_cores(model, {n: eye + sign * eps * d for n, d in D.items()}, 1.0)
        try:
            return heldout_loss(model, batches)
        finally:
            restore_safety_b(model, saved)

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    assert abs(numeric) > 1e-3  # a step the loss responds to
    # delta = alpha M' - I: M' = (I + D) / 2 at alpha 2 is the step D
    assert first_order_change(g, {n: (eye + d) / 2 for n, d in D.items()}, 2.0) == pytest.approx(numeric, rel=2e-3)
    with pytest.raises(ValueError, match="no gradient for 1 merged modules"):
        first_order_change({n: g[n] for n in names[1:]}, D, 1.0)


def test_activate_adapters_sums_both(base_dir, adapters, both_model) -> None:
    """Both adapters active == base weights plus dW_u + dW_s (a check that both really run)."""
    u, s = read_adapter(adapters[0]), read_adapter(adapters[1])
    base = load_base(base_dir)
    with torch.no_grad():
        for name, f in u.modules.items():
            base.get_submodule(name).weight += (f.delta() + s.modules[name].delta()).float()
    ids = make_batch([10, 10], T=10)["input_ids"]
    both_model.eval()
    with torch.no_grad():
        both = both_model(input_ids=ids).logits
        assert rel(both, base(input_ids=ids).logits) < 1e-5
        both_model.base_model.set_adapter("utility")
        assert rel(both_model(input_ids=ids).logits, both) > 1e-4
    with pytest.raises(ValueError, match="not loaded"):
        fisher.activate_adapters(both_model, ["utility", "safty"])


def test_fisher_batch_validation(both_model) -> None:
    good = make_batch([8, 8], T=8)
    for key in ("input_ids", "attention_mask", "labels"):
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            fisher.per_example_core_grads(both_model, {k: v for k, v in good.items() if k != key}, "safety")
    with pytest.raises(ValueError, match="labels.*shape"):
        fisher.per_example_core_grads(both_model, {**good, "labels": good["labels"][:, :5]}, "safety")
    no_labels = {**good, "labels": good["labels"].clone()}
    no_labels["labels"][1] = -100
    with pytest.raises(ValueError, match=r"examples \[1\] have no label token"):
        fisher.per_example_core_grads(both_model, no_labels, "safety")
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        fisher.per_example_core_grads(both_model, {**good, "labels": good["labels"].tolist()}, "safety")
    with pytest.raises(ValueError, match="no LoRA layer holds adapter 'safty'"):
        fisher.per_example_core_grads(both_model, good, "safty")
    both_model.base_model.set_adapter("utility")
    with pytest.raises(ValueError, match="not active"):
        fisher.per_example_core_grads(both_model, good, "safety")


def dense_ggn(model, batch: dict, adapter: str, module: str) -> torch.Tensor:
    """Independent float64 oracle: ``(1/N) sum_i (1/T_i) sum_t J_t^T (diag p_t - p_t p_t^T) J_t`` with
    ``J_t = d logits_t / d vec(M)`` of one module's core by central differences."""
    layer = fisher.lora_layers(model, adapter)[module]
    r = layer.lora_A[adapter].out_features
    model.eval()
    total = torch.zeros(r * r, r * r, dtype=torch.float64)
    N = batch["input_ids"].shape[0]
    for i in range(N):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i: i + 1, :n]
        target = (batch["labels"][i, 1:n] != -100).nonzero().flatten()  # logits at t predict token t + 1

        def logits_at(M):
            h = layer.lora_A[adapter].register_forward_hook(lambda m, a, o: o @ M.T)
            try:
                with torch.no_grad():
                    return model(input_ids=ids, use_cache=False).logits[0, target].double()
            finally:
                h.remove()

        eye = torch.eye(r, dtype=torch.float64)
        cols = []
        for j in range(r * r):
            d = torch.zeros(r * r, dtype=torch.float64)
            d[j] = 1e-4
            cols.append((logits_at(eye + d.view(r, r)) - logits_at(eye - d.view(r, r))) / 2e-4)
        J = torch.stack(cols, dim=-1)  # [T, V, r^2]
        p = torch.softmax(logits_at(eye), dim=-1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        total += torch.einsum("tvj,tvw,twk->jk", J, H, J) / len(target)
    return total / N


def test_sampled_fisher_is_an_unbiased_gauss_newton(both_model) -> None:
    """The sampled Fisher (labels drawn from the model, weighted by the label count) converges to the
    dense float64 Gauss-Newton matrix; the empirical Fisher does not."""
    both_model.double()
    batch = make_batch([10, 6, 8], T=10, seed=3)
    module = "model.layers.1.self_attn.v_proj"
    oracle = dense_ggn(both_model, batch, "safety", module)
    copies = 600  # MC error 0.04-0.09 at 300 copies, 0.02-0.045 at 1200, 0.012-0.016 at 4800 (3 seeds): 1/sqrt(n)
    big = {k: v.repeat(copies, 1) for k, v in batch.items()}  # independent draws per copy
    sampled = fisher.estimate_fisher(both_model, [big], "safety", curvature="sampled", seed=0).full[module]
    once = [fisher.estimate_fisher(both_model, [batch], "safety", curvature="sampled", seed=s).full[module]
            for s in (0, 0, 1)]
    empirical = fisher.estimate_fisher(both_model, [batch], "safety").full[module]
    assert torch.equal(once[0], once[1]) and not torch.equal(once[0], once[2])  # seeded
    assert rel(sampled, oracle) < 0.1, rel(sampled, oracle)
    assert rel(empirical, oracle) > 0.3


def test_fisher_halves_and_gradient_at_core_zero(both_model) -> None:
    """Halves are the even/odd examples; core = 0 gives the gradient at M = 0 (adapter switched off)."""
    batch = make_batch([10, 8, 6, 9], T=10, seed=4)
    est = fisher.estimate_fisher(both_model, [batch], "safety")
    grads = fisher.per_example_core_grads(both_model, batch, "safety")
    name = "model.layers.0.mlp.up_proj"
    vec = grads[name].reshape(4, -1).double()
    assert rel(est.halves[0][name], vec[0::2].T @ vec[0::2] / 2) < 1e-6
    assert rel(est.halves[1][name], vec[1::2].T @ vec[1::2] / 2) < 1e-6
    assert rel(est.full[name], vec.T @ vec / 4) < 1e-6
    at_zero = fisher.per_example_core_grads(both_model, batch, "safety", core=0.0)
    slow = naive_core_grads(both_model, batch, "safety", core=0.0)
    for n in slow:
        assert rel(at_zero[n], slow[n]) < 1e-5, n
    assert rel(at_zero[name], grads[name]) > 1e-2


def test_euclidean_projection_is_a_piece_of_the_update(module_inputs: ModuleInputs) -> None:
    """Both projections exact at k = r^2; the Euclidean one is the Frobenius-orthogonal projection of
    dW_s onto the same span (kept fraction <= 1, residual orthogonal to the span)."""
    n = R_S**2
    u, s = module_inputs.utility.delta(), module_inputs.safety.delta()
    singular = replace(module_inputs, fisher_u=random_fisher(6, R_S, torch.Generator().manual_seed(5)))
    for proj in sst.PROJECTIONS:
        full = run_method("sst", singular, MethodParams(k=n, projection=proj))
        assert rel(full.delta, u + s) < 1e-10, proj
    gevp = sst.solve_gevp(singular.fisher_s, singular.fisher_u, 1e-3)
    for k in (1, 4, 9, 15):
        M, kept = sst.project_core_euclidean(gevp, k, singular.safety)
        dW = sst.core_delta(singular.safety, M)
        assert kept <= 1 + 1e-12 and kept == pytest.approx(float(dW.norm() / s.norm()), rel=1e-9)
        Q = torch.linalg.qr(gevp.V[:, :k]).Q  # residual is Frobenius-orthogonal to every direction kept
        for j in range(k):
            direction = sst.core_delta(singular.safety, Q[:, j].reshape(R_S, R_S))
            assert abs(float(((s - dW) * direction).sum())) < 1e-9 * float(s.norm() * direction.norm())
    stats = run_method("sst", singular, MethodParams(k=4, projection="euclidean")).stats
    assert stats["kept_fraction"] <= 1


def test_sst_diagnostics_against_direct_computation(module_inputs: ModuleInputs) -> None:
    gen = torch.Generator().manual_seed(7)
    halves = ((random_fisher(40, R_S, gen), random_fisher(30, R_S, gen)),
              (random_fisher(40, R_S, gen), random_fisher(30, R_S, gen)))
    same = ((module_inputs.fisher_s, module_inputs.fisher_u),) * 2
    k, alpha = 5, 0.7
    res = run_method("sst", replace(module_inputs, fisher_halves=halves), MethodParams(k=k, alpha=alpha))
    st = res.stats
    ev = torch.tensor(st["eigenvalues"])
    assert st["eigengap_at_k"] == pytest.approx(float(ev[k - 1] / ev[k]))
    delta = (alpha * res.core - torch.eye(R_S, dtype=torch.float64)).reshape(-1)
    assert st["predicted_safety_loss_change"] == pytest.approx(0.5 * float(delta @ module_inputs.fisher_s @ delta))
    assert st["predicted_utility_loss_change"] == pytest.approx(0.5 * float(delta @ module_inputs.fisher_u @ delta))
    assert 1 <= st["effective_rank_gevp"] <= R_S**2 and 0 <= st["core_in_eps_dominated"] <= 1
    assert 0 < st["subspace_overlap"] < 1
    stable = run_method("sst", replace(module_inputs, fisher_halves=same), MethodParams(k=k)).stats
    assert stable["subspace_overlap"] == pytest.approx(1.0) and stable["subspace_max_angle_deg"] < 1e-3
    from sst_lab.merge.diagnostics import effective_rank

    assert effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)


def test_kept_fraction_warning_is_printed(capsys) -> None:
    from sst_lab.merge.pipeline import _kept_fraction_warning

    assert _kept_fraction_warning({"a": {"kept_fraction": 0.9}, "b": {"rel_dist_base": 2.0}}) is None
    line = _kept_fraction_warning({"a": {"kept_fraction": 0.9}, "b": {"kept_fraction": 2.5}})
    assert "1 of 2 modules (max 2.50 in b)" in line and f"WARNING: {line}" in capsys.readouterr().out


def test_non_finite_diagnostics_are_left_out_of_mlflow_with_their_reason() -> None:
    """A NaN or inf diagnostic never reaches MLflow and never vanishes: it is named with its reason,
    and a summary over fewer modules says how many it lacks."""
    from sst_lab.merge.pipeline import _metrics

    modules = {"a": {"eigengap_at_k": 2.0, "kept_fraction": float("nan"), "rel_dist_utility": None},
               "b": {"eigengap_at_k": float("inf"), "kept_fraction": float("nan"), "rel_dist_utility": 0.5}}
    metrics, omitted = _metrics(modules, {"fidelity/safety_ratio": float("nan"), "merge_seconds": 1.5,
                                          "kept_fraction_warning": "text"})
    assert metrics["merge/eigengap_at_k/mean"] == 2.0 and metrics["merge/eigengap_at_k/n_nonfinite"] == 1.0
    assert "merge/module/b/eigengap_at_k" not in metrics and metrics["merge/module/a/eigengap_at_k"] == 2.0
    assert omitted["merge/module/b/eigengap_at_k"] == "non-finite value inf in module b"
    assert omitted["merge/kept_fraction/mean"] == "non-finite in all 2 modules"
    assert not any(k.startswith("merge/kept_fraction/m") for k in metrics)
    assert omitted["merge/fidelity/safety_ratio"] == "non-finite value nan" and metrics["merge/merge_seconds"] == 1.5
    # None means "not applicable here" (no utility factor in module a), not a broken number
    assert metrics["merge/rel_dist_utility/mean"] == 0.5 and not any("rel_dist_utility" in k for k in omitted)
    assert all(np.isfinite(v) for v in metrics.values())
