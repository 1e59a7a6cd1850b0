"""Library code of the merge stage: plan, (Fisher), merge every module, check, write, report.

Order of work (mergekit's "plan, check, execute, commit"): resolve both adapters (paths or train
run ids), read them, pair modules by name and check compatibility *before* any tensor is touched;
then compute Fisher blocks when the method needs them (curvature and point chosen, two halves for
stability, held-out examples for fidelity), merge module by module through the method registry,
factorise each merged dW exactly (or at a requested rank, refused above ``TRUNCATION_TOLERANCE``
unless allowed), measure the SST step's held-out loss change, check the result differs from the
base and from each input, and write the merged adapter atomically.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from sst_lab.config import ConfigError
from sst_lab.data import load_training_records, sample, training_items
from sst_lab.adapters import ITEMS_FILE, check_adapter_folder, describe
from sst_lab.held_out import check_refs, exclude_held_out
from sst_lab.io import atomic_dir, is_complete, write_json_atomic
from sst_lab.merge.lora import (AdapterWeights, MergePlan, factorise_exact, plan_merge, read_adapter, refactorise,
                                write_adapter, zero_factors)
from sst_lab.merge.methods import MethodParams, ModuleInputs, available_methods, get_method, run_method
from sst_lab.merge.fisher import CURVATURES
from sst_lab.merge.sst import global_k_budget, solve_gevp
from sst_lab.models import ModelError, check_adapter_base, local_model_dir, resolve_model_path, write_base_record
from sst_lab.tracking.lineage import Upstream, resolve

FISHER_METHODS = ("sst", "sst_diag")
FISHER_POINTS = ("merged", "own")
KEPT_FRACTION_WARNING = "kept_fraction_above_1"  # tag set when a module keeps more than its safety update
OMITTED_TAG = "merge.omitted_metrics"  # metric names left out of MLflow (non-finite or undefined); reasons in the report
TRUNCATION_TOLERANCE = 1e-4  # relative Frobenius error above which an output_rank truncation is refused


@dataclass
class MergeArguments:
    """What to merge, how, and with which Fisher data. Method parameters left unset are not passed:
    a parameter the chosen method does not use is an error (a ``k`` that changes nothing)."""

    utility_adapter: str | None = field(default=None, metadata={"help": "Utility adapter folder or train run id."})
    safety_adapter: str | None = field(default=None, metadata={"help": "Safety adapter folder or train run id."})
    base_model: str | None = field(default=None, metadata={
        "help": "Base model; default: the adapters' base_model_name_or_path (must agree)."})
    method: str | None = field(default=None, metadata={"help": "Merge method (registry name); required."})
    weights: list[float] | None = field(default=None, metadata={
        "help": "(utility, safety) weights for linear/cat/svd/ties/dare_*; default (1, 1)."})
    density: float | None = field(default=None, metadata={"help": "ties/dare_*: fraction of entries kept."})
    ties_lambda: float | None = field(default=None, metadata={"help": "ties/dare_ties: scale of the merged update."})
    svd_rank: int | None = field(default=None, metadata={"help": "svd: truncation rank."})
    k: int | None = field(default=None, metadata={"help": "sst/sst_diag: directions kept per module (0..r^2)."})
    k_global: int | None = field(default=None, metadata={
        "help": "sst: a global budget of directions over all modules (top eigenvalues), instead of k."})
    alpha: float | None = field(default=None, metadata={"help": "sst/sst_diag: scale of the projected safety update."})
    eps_rel: float | None = field(default=None, metadata={
        "help": "sst/sst_diag: damping eps = eps_rel * mean eigenvalue of F_u (default 1e-3)."})
    seed: int = field(default=0, metadata={"help": "Seed (DARE masks, Fisher example draw)."})
    fisher_safety_data: str = field(default="tiny-world:safety_train.jsonl", metadata={
        "help": "Safety Fisher data (harmful prompt -> refusal), any training format."})
    fisher_utility_data: str = field(default="tiny-world:utility_train.jsonl", metadata={
        "help": "Utility Fisher data, any training format."})
    fisher_format: str = field(default="auto", metadata={"help": "Format of both Fisher data sets."})
    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ("fisher_exclude_items_of",)  # sst_lab.config.to_dict
    fisher_exclude_items_of: list[str] | None = field(default=None, metadata={
        "help": "Evaluation suite splits '<suite>:<validation|test>' whose items (by id or prompt_sha) leave both "
                "Fisher data sets before the examples are drawn (as train's exclude_items_of: the Fisher examples "
                "join the merged adapter's training_items.json, which evaluate checks)."})
    fisher_n: int = field(default=256, metadata={"help": "Examples drawn (with the seed) from each Fisher data set."})
    fisher_batch_size: int = field(default=16, metadata={"help": "Examples per forward/backward."})
    max_length: int = field(default=512, metadata={"help": "Token limit of a Fisher example."})
    fisher_dtype: str = field(default="float32", metadata={"help": "Model dtype for the Fisher pass."})
    curvature: str = field(default="sampled", metadata={
        "help": "sst/sst_diag: 'sampled' Fisher (labels drawn from the model, seeded: a Monte Carlo Gauss-Newton; "
                "default, measured closer to the real loss change) or 'empirical' Fisher (data labels). See "
                "merge/README.md."})
    fisher_point: str = field(default="merged", metadata={
        "help": "sst/sst_diag: where the Fishers are taken: 'merged' (base + utility + safety) or 'own' (safety "
                "data at base + safety, utility data at base + utility, safety core at 0)."})
    projection: str | None = field(default=None, metadata={
        "help": "sst: 'euclidean' (Frobenius of the update: a piece of it, the default) or 'metric' (F_u + eps I, "
                "oblique: can keep more than the update)."})
    fisher_heldout_n: int = field(default=32, metadata={
        "help": "sst/sst_diag: examples per Fisher data set held out (never in the Fisher) to measure the loss "
                "change the curvature predicts."})
    output_rank: int | None = field(default=None, metadata={
        "help": "Rank of the merged LoRA. Default: exact, each module at the exact rank of its merged dW "
                "(r_u + r_s for linear/cat/sst, up to min(out, in) for ties/dare_*). A given rank that loses "
                f"more than {TRUNCATION_TOLERANCE:g} of a module's update (relative Frobenius) fails the run "
                "unless allow_truncation."})
    allow_truncation: bool = field(default=False, metadata={
        "help": "Accept an output_rank that truncates the merged update (the error is logged per module)."})
    save_full_model: bool = field(default=False, metadata={
        "help": "Also write base + merged adapter folded into one full model (output_dir/full_model)."})
    allow_identical_to_input: bool = field(default=False, metadata={
        "help": "Allow a merge equal to an input (e.g. k=0 or alpha=0); otherwise that fails the run."})
    trained_elsewhere: bool = field(default=False, metadata={
        "help": "Accept adapter folders without the SST_LAB_DONE marker or training_items.json (trained "
                "outside sst-lab); the run is tagged adapter_trained_elsewhere."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the merged adapter goes."})
    run_name: str | None = field(default=None, metadata={"help": "MLflow run name."})

    def __post_init__(self):
        if not self.method:
            raise ConfigError(f"method is required; one of {available_methods()}")
        if self.method not in available_methods():
            get_method(self.method)  # raises with "did you mean"
        if self.k is not None and self.k_global is not None:
            raise ConfigError("give k (per module) or k_global (global budget), not both")
        if self.k_global is not None and self.method != "sst":
            raise ConfigError(f"k_global is an sst option; method is {self.method!r}")
        if self.fisher_n <= 0 or self.fisher_batch_size <= 0 or self.fisher_heldout_n <= 0:
            raise ConfigError("fisher_n, fisher_batch_size and fisher_heldout_n must be positive")
        if self.alpha is not None and not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}: a negative alpha subtracts the (projected) "
                              "safety update, i.e. merges an anti-safety adapter")
        if self.k is not None and self.k < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")
        if self.fisher_exclude_items_of is not None:
            check_refs(self.fisher_exclude_items_of, "fisher_exclude_items_of")
        if self.curvature not in CURVATURES:
            raise ConfigError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.fisher_point not in FISHER_POINTS:
            raise ConfigError(f"fisher_point must be one of {FISHER_POINTS}, got {self.fisher_point!r}")
        defaults = {f.name: f.default for f in fields(self)}
        if self.method not in FISHER_METHODS and any(getattr(self, n) != defaults[n] for n in ("curvature",
                                                                                            "fisher_point")):
            raise ConfigError(f"curvature/fisher_point are options of {FISHER_METHODS}; method is {self.method!r}")

    def method_params(self, k: int | None = None) -> MethodParams:
        given = {"weights": tuple(self.weights) if self.weights is not None else None, "density": self.density,
                 "ties_lambda": self.ties_lambda, "rank": self.svd_rank, "k": self.k if k is None else k,
                 "alpha": self.alpha, "eps_rel": self.eps_rel, "projection": self.projection}
        if self.method.startswith("dare"):
            given["seed"] = self.seed
        return MethodParams(**{key: v for key, v in given.items() if v is not None})


@dataclass
class Inputs:
    utility: Upstream
    safety: Upstream
    u: AdapterWeights
    s: AdapterWeights
    base_model: str
    trained_elsewhere: list[str] = field(default_factory=list)  # adapters accepted without sst-lab's records


def resolve_inputs(args: MergeArguments, work: Path, tracking_uri: str | None) -> Inputs:
    if not args.utility_adapter or not args.safety_adapter:
        raise ConfigError("utility_adapter and safety_adapter are required (adapter folders or train run ids)")
    up_u = resolve(args.utility_adapter, artifact_path="adapter", expect_stage="train", dst=work / "utility",
                   tracking_uri=tracking_uri, field_name="utility_adapter")
    up_s = resolve(args.safety_adapter, artifact_path="adapter", expect_stage="train", dst=work / "safety",
                   tracking_uri=tracking_uri, field_name="safety_adapter")
    elsewhere = []
    for field_name, up in (("utility_adapter", up_u), ("safety_adapter", up_s)):
        check_adapter_folder(up.path, where=_where(field_name, up), trained_elsewhere=args.trained_elsewhere)
        if args.trained_elsewhere and not (is_complete(up.path) and (up.path / ITEMS_FILE).is_file()):
            elsewhere.append(field_name)
    u, s = read_adapter(up_u.path), read_adapter(up_s.path)
    declared = u.base_model_name_or_path
    base = args.base_model or declared
    if base is None:
        raise ConfigError("base_model: not given and the adapters do not name one")
    if args.base_model and declared and resolve_model_path(args.base_model) != declared \
            and Path(resolve_model_path(args.base_model)).name != Path(declared).name:
        raise ConfigError(f"base_model {args.base_model!r} differs from the adapters' base {declared!r}")
    base_path = resolve_model_path(base)
    for field_name, upstream in (("utility_adapter", up_u), ("safety_adapter", up_s)):
        try:
            check_adapter_base(str(upstream.path), base_path)
        except ModelError as exc:
            raise ConfigError(f"{field_name}: {exc}") from None
    return Inputs(up_u, up_s, u, s, base, elsewhere)


def _where(field_name: str, up: Upstream) -> str:
    return describe(field_name, up.path, up.run_id, up.tags.get("stage"))


@dataclass
class FisherContext:
    """Fishers of the safety core (full and two halves per side), the model they came from (both
    adapters loaded) and the held-out batches of each Fisher data set."""

    F_s: dict
    F_u: dict
    halves: tuple[tuple[dict, dict], tuple[dict, dict]]
    model: Any
    heldout: dict[str, list[dict]]
    info: dict[str, Any]
    items: list[dict]


def _fisher(args: MergeArguments, inputs: Inputs) -> FisherContext:
    """F_s and F_u of the safety core on the two Fisher data sets, of the chosen curvature, at the
    chosen point (``fisher_point``); ``fisher_heldout_n`` examples of each set are held out."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sst_lab.merge.fisher import activate_adapters, estimate_fisher
    from sst_lab.merge.fisher_data import make_batches
    from sst_lab.models import load_tokenizer
    from sst_lab.train.lora_sft import resolve_dataset_name

    path = resolve_model_path(inputs.base_model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.fisher_dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    model = PeftModel.from_pretrained(model, str(inputs.utility.path), adapter_name="utility")
    model.load_adapter(str(inputs.safety.path), adapter_name="safety")
    tok = load_tokenizer(path, padding_side="right")
    own = args.fisher_point == "own"
    # (adapters active, safety core) per side: the merged point, or each adapter at its own point
    points = {"safety": (["safety"] if own else ["utility", "safety"], 1.0),
              "utility": (["utility", "safety"], 0.0 if own else 1.0)}
    est, info, items, heldout = {}, {"fisher_curvature": args.curvature, "fisher_point": args.fisher_point}, [], {}
    for i, (which, name) in enumerate((("safety", args.fisher_safety_data), ("utility", args.fisher_utility_data))):
        source = resolve_dataset_name(name)
        records = load_training_records(source, fmt=args.fisher_format, sample_size=None, seed=args.seed)
        if args.fisher_exclude_items_of:  # before the draw, as in the train stage
            records, excluded = exclude_held_out(records, args.fisher_exclude_items_of, source,
                                                  "fisher_exclude_items_of")
            info[f"fisher_{which}_n_excluded_held_out"] = excluded["n_excluded"]
        total = min(len(records), args.fisher_n + args.fisher_heldout_n)
        if total - args.fisher_heldout_n < 1:
            raise ConfigError(f"fisher_{which}_data {source}: {len(records)} examples cannot give fisher_heldout_n = "
                              f"{args.fisher_heldout_n} held-out examples and a Fisher; lower fisher_heldout_n")
        if len(records) > total:
            records = sample(records, total, args.seed, source)
        fisher_records, held = records[:total - args.fisher_heldout_n], records[total - args.fisher_heldout_n:]
        batches = make_batches(fisher_records, tok, max_length=args.max_length, batch_size=args.fisher_batch_size,
                               source=source)
        heldout[which] = make_batches(held, tok, max_length=args.max_length, batch_size=args.fisher_batch_size,
                                      source=source)
        adapters, core = points[which]
        activate_adapters(model, adapters)
        t0 = time.perf_counter()
        est[which] = estimate_fisher(model, batches, "safety", curvature=args.curvature, seed=args.seed * 2 + i,
                                     diag=args.method != "sst", core=core)
        info[f"fisher_{which}_seconds"] = time.perf_counter() - t0
        info[f"fisher_{which}_n"] = len(fisher_records)
        info[f"fisher_{which}_heldout_n"] = len(held)
        items += training_items(fisher_records)
    activate_adapters(model, ["utility", "safety"])
    s, u = est["safety"], est["utility"]
    return FisherContext(s.full, u.full, ((s.halves[0], u.halves[0]), (s.halves[1], u.halves[1])), model, heldout,
                         info, items)


def measure_fidelity(ctx: FisherContext, cores: dict[str, torch.Tensor], alpha: float,
                     report_modules: dict[str, dict]) -> tuple[dict[str, float], dict[str, str]]:
    """Held-out loss change of the merge step (base + utility + safety -> merged) on each Fisher data
    set, beside the quadratic model's prediction (sum over modules of ``0.5 delta^T F delta``) and the
    second-order Taylor model's (``g^T delta`` added, ``g`` the held-out loss gradient at the start).
    Also returns each ratio left out, with the reason."""
    from sst_lab.merge.diagnostics import (fidelity, first_order_change, heldout_core_gradient, heldout_loss,
                                           restore_safety_b, set_safety_cores)

    grads = {w: heldout_core_gradient(ctx.model, b) for w, b in ctx.heldout.items()}
    before = {w: heldout_loss(ctx.model, b) for w, b in ctx.heldout.items()}
    saved = set_safety_cores(ctx.model, cores, alpha)
    try:
        after = {w: heldout_loss(ctx.model, b) for w, b in ctx.heldout.items()}
    finally:
        restore_safety_b(ctx.model, saved)
    out: dict[str, float] = {}
    omitted: dict[str, str] = {}
    for which in ("safety", "utility"):
        key = f"predicted_{which}_loss_change"
        if not all(key in m for m in report_modules.values()):
            continue
        predicted = sum(m[key] for m in report_modules.values())
        first = first_order_change(grads[which], cores, alpha)
        measured = after[which] - before[which]
        out.update({f"fidelity/{which}_loss_before": before[which], f"fidelity/{which}_loss_after": after[which],
                    f"fidelity/{which}_measured_change": measured, f"fidelity/{which}_predicted_change": predicted,
                    f"fidelity/{which}_first_order_change": first,
                    f"fidelity/{which}_taylor_predicted_change": first + predicted})
        for name, value in (("ratio", predicted), ("taylor_ratio", first + predicted)):
            ratio = fidelity(value, measured)
            if ratio is not None:
                out[f"fidelity/{which}_{name}"] = ratio
            else:
                omitted[f"merge/fidelity/{which}_{name}"] = (f"measured {which} loss change {measured:.2e} nats is "
                                                             "below 1e-6 in magnitude: a ratio would be noise")
    return out, omitted


def base_weight_norms(base_model: str, names: list[str]) -> dict[str, float]:
    """Frobenius norms of the base weights of the adapted modules, read lazily from safetensors."""
    from safetensors import safe_open

    path = local_model_dir(base_model)
    wanted = {f"{n}.weight": n for n in names}
    norms: dict[str, float] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                short = key.removeprefix("model.") if key not in wanted else key
                for cand in (key, short, "model." + key):
                    if cand in wanted:
                        norms[wanted[cand]] = float(fh.get_tensor(key).double().norm())
    missing = sorted(set(names) - set(norms))
    if missing:
        raise ValueError(f"base model {base_model}: no weights found for adapted modules {missing[:5]}")
    return norms


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom > 0 else float("nan")


@dataclass
class MergeOutcome:
    adapter_dir: Path
    report: dict[str, Any]
    metrics: dict[str, float]


def run_merge(args: MergeArguments, inputs: Inputs, run: Any, resolved_config: dict, out_dir: Path) -> MergeOutcome:
    t_start = time.perf_counter()
    plan = plan_merge(inputs.u, inputs.s, utility_label=_where("utility_adapter", inputs.utility),
                      safety_label=_where("safety_adapter", inputs.safety))
    rules = plan.rules()
    info: dict[str, Any] = {"n_modules": len(plan.pairs), **{f"n_modules_{r}": len(v) for r, v in rules.items()}}
    check_k(args, plan)
    F_s = F_u = ctx = None
    fisher_items: list[dict] = []
    if args.method in FISHER_METHODS:
        ctx = _fisher(args, inputs)
        F_s, F_u, fisher_items = ctx.F_s, ctx.F_u, ctx.items
        info.update(ctx.info)
    per_module_k = None
    if args.k_global is not None:
        eps_rel = args.eps_rel if args.eps_rel is not None else MethodParams().eps_rel
        spectra = {p.name: solve_gevp(F_s[p.name], F_u[p.name], eps_rel, module=p.name).eigenvalues
                   for p in plan.pairs if p.rank_safety}
        per_module_k = global_k_budget(spectra, args.k_global)
    norms = base_weight_norms(inputs.base_model, plan.names)

    t0 = time.perf_counter()
    modules, report_modules, ranks, cores = {}, {}, {}, {}
    for pair in plan.pairs:
        n = pair.name
        fu = inputs.u.modules.get(n) or zero_factors(pair.shape)
        fs = inputs.s.modules.get(n) or zero_factors(pair.shape)
        if pair.rule == "utility_only" and args.method in FISHER_METHODS:
            dW_m, stats = fu.delta(), {}  # no safety core here: SST adds alpha * P(0) = 0
        else:
            params = args.method_params(k=None if per_module_k is None else per_module_k.get(n))
            halves = None if ctx is None or args.method != "sst" else tuple((h[0][n], h[1][n]) for h in ctx.halves)
            result = run_method(args.method, ModuleInputs(n, fu, fs, None if F_s is None else F_s[n],
                                                          None if F_u is None else F_u[n], halves), params)
            if result.core is not None:
                cores[n] = result.core
            dW_m, stats = result.delta, _jsonable(result.stats)
        dW_u, dW_s = fu.delta(), fs.delta()
        if args.output_rank is None:
            A, B, err, rank_n = factorise_exact(dW_m)
        else:
            rank_n = min(args.output_rank, *dW_m.shape)
            A, B, err = refactorise(dW_m, rank_n)
        modules[n] = (A, B)
        ranks[n] = rank_n
        if stats.get("eigenvalues"):
            stats["top_eigenvalue"] = stats["eigenvalues"][0]
        entry = {**stats, "rule": pair.rule, "output_rank": rank_n, "refactor_rel_error": err,
                 "rel_dist_base": float(dW_m.norm()) / norms[n],
                 "rel_dist_utility": _rel(dW_m, dW_u) if pair.rank_utility else None,
                 "rel_dist_safety": _rel(dW_m, dW_s) if pair.rank_safety else None,
                 "safety_norm_rel_base": float(dW_s.norm()) / norms[n]}
        report_modules[n] = entry
    info["merge_seconds"] = time.perf_counter() - t0
    _check_distinct(args, report_modules)
    _check_truncation(args, report_modules)
    fidelity_omitted: dict[str, str] = {}
    if ctx is not None and args.method == "sst":
        fid, fidelity_omitted = measure_fidelity(ctx, cores, args.method_params().alpha, report_modules)
        info.update(fid)
    warning = _kept_fraction_warning(report_modules)

    if warning:
        info["kept_fraction_warning"] = warning
    report = {"method": args.method, "params": _jsonable(vars(args.method_params())),
              "output_rank": args.output_rank or "exact",
              "base_model": inputs.base_model, "modules": report_modules, "module_rules": rules, **info}
    metrics, omitted = _metrics(report_modules, info)
    omitted.update(fidelity_omitted)
    if omitted:
        report["omitted_metrics"] = omitted
        print(f"WARNING: {len(omitted)} merge metric(s) not logged (reasons in merge_report.json, "
              f"omitted_metrics): {', '.join(sorted(omitted)[:5])}", flush=True)
    metrics["merge/total_seconds"] = time.perf_counter() - t_start
    metrics["merge/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        metrics["merge/peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30

    if run.enabled:
        with atomic_dir(out_dir) as tmp:
            write_adapter(tmp, modules, base_model_name_or_path=inputs.u.base_model_name_or_path, rank=ranks,
                          template_config=inputs.u.config)
            lineage_items = (_items(inputs.utility.path) + _items(inputs.safety.path) + fisher_items)
            write_json_atomic(tmp / "training_items.json", _dedup(lineage_items))
            write_json_atomic(tmp / "merge_report.json", report)
            base_record = write_base_record(tmp, inputs.base_model)
            import yaml

            (tmp / "resolved_config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
            if args.save_full_model:
                save_full_model(inputs.base_model, tmp, tmp / "full_model")
        run.log_metrics(metrics)
        run.log_artifacts(out_dir, "adapter")
        run.log_json(report, "merge_report.json")
        run.set_tags({"base_weights_fingerprint": base_record["weights_fingerprint"],
                      **({KEPT_FRACTION_WARNING: warning} if warning else {}),
                      **({OMITTED_TAG: ",".join(sorted(omitted))[:4000]} if omitted else {})})
        _plot_spectra(report_modules, out_dir.parent / f".{out_dir.name}-spectrum.png", run)
    return MergeOutcome(out_dir, report, metrics)


def check_k(args: MergeArguments, plan: MergePlan) -> None:
    """``k`` (per module) must fit every safety core (r² directions); checked before the Fisher pass."""
    if args.method not in FISHER_METHODS:
        return
    cores = {p.name: p.rank_safety ** 2 for p in plan.pairs if p.rank_safety}
    if args.k is not None:
        over = sorted(n for n, size in cores.items() if args.k > size)
        if over:
            raise ConfigError(f"k = {args.k} exceeds the r² = {cores[over[0]]} core directions of safety module "
                              f"{over[0]!r} ({len(over)} modules affected); k must be in [0, r²]")
    if args.k_global is not None and args.k_global > sum(cores.values()):
        raise ConfigError(f"k_global = {args.k_global} exceeds the {sum(cores.values())} core directions of all "
                          f"{len(cores)} safety modules")


def save_full_model(base_model: str, adapter_dir: Path, out: Path) -> None:
    """Fold the merged adapter into the base weights (``merge_and_unload``) and save model + tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sst_lab.models import load_tokenizer

    path = resolve_model_path(base_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(adapter_dir))
    model.merge_and_unload().save_pretrained(str(out))
    load_tokenizer(path).save_pretrained(str(out))


def _items(adapter_dir: Path) -> list[dict]:
    f = Path(adapter_dir) / "training_items.json"
    return json.loads(f.read_text()) if f.is_file() else []


def _dedup(items: list[dict]) -> list[dict]:
    seen, out = set(), []
    for it in items:
        key = (it["id"], it["prompt_sha"])
        if key not in seen:
            seen.add(key)
            out.append(it)
    return out


def _check_distinct(args: MergeArguments, modules: dict[str, dict]) -> None:
    """The merged model must differ from the base and from each input (unless explicitly allowed)."""
    tol = 1e-9
    if all(m["rel_dist_base"] <= tol for m in modules.values()):
        raise RuntimeError(f"merge {args.method}: the merged update is zero in every module: the merged model "
                           "IS the base model")
    for which in ("utility", "safety"):
        dist = [m[f"rel_dist_{which}"] for m in modules.values()]
        if all(d is not None and d <= tol for d in dist) and not args.allow_identical_to_input:
            raise RuntimeError(f"merge {args.method}: the merged model equals the {which} input in every module "
                               "(e.g. k=0 or alpha=0); pass allow_identical_to_input to accept that")


def _kept_fraction_warning(modules: dict[str, dict]) -> str | None:
    """A line (printed, and a run tag) when a projection keeps more than the safety update in some
    module (``kept_fraction > 1``: the F_u-metric projection is oblique; merge/README.md)."""
    above = {n: m["kept_fraction"] for n, m in modules.items() if m.get("kept_fraction", 0) > 1}
    if not above:
        return None
    worst = max(above, key=above.get)
    line = (f"kept_fraction > 1 in {len(above)} of {len(modules)} modules (max {above[worst]:.2f} in {worst}): the "
            "projected safety update is larger than the safety update itself (see merge/README.md)")
    print(f"WARNING: {line}", flush=True)
    return line


def _check_truncation(args: MergeArguments, modules: dict[str, dict]) -> None:
    """An ``output_rank`` that drops more than ``TRUNCATION_TOLERANCE`` of any module's update fails
    the run (naming the modules) unless ``allow_truncation``; the exact default never truncates."""
    lossy = {n: m["refactor_rel_error"] for n, m in modules.items() if m["refactor_rel_error"] > TRUNCATION_TOLERANCE}
    if args.output_rank is None and lossy:
        raise RuntimeError(f"merge {args.method}: exact factorisation lost {max(lossy.values()):.2e} "
                           f"in {sorted(lossy)[:3]}")
    if lossy and not args.allow_truncation:
        worst = sorted(lossy.items(), key=lambda kv: -kv[1])[:5]
        listed = ", ".join(f"{n}: {e:.3f}" for n, e in worst)
        raise ValueError(f"output_rank = {args.output_rank} truncates the {args.method} merge in {len(lossy)} of "
                         f"{len(modules)} modules by more than {TRUNCATION_TOLERANCE:g} (relative Frobenius error; "
                         f"worst: {listed}); leave output_rank unset for the exact merge or pass allow_truncation")


def _metrics(modules: dict[str, dict], info: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """MLflow metrics of the report: per-module values, their mean/min/max over modules, and the
    run-level numbers; and every number left out (a NaN or inf, which MLflow must not get) by its
    metric name, with the reason. A summary over fewer modules than the key has carries
    ``merge/<key>/n_nonfinite``."""
    out: dict[str, float] = {}
    omitted: dict[str, str] = {}
    keys = sorted({k for m in modules.values() for k, v in m.items() if _number(v)})
    for key in keys:
        vals = [m[key] for m in modules.values() if _finite(m.get(key))]
        bad = [name for name, m in modules.items() if _number(m.get(key)) and not _finite(m[key])]
        for name in bad:
            omitted[f"merge/module/{name}/{key}"] = f"non-finite value {modules[name][key]!r} in module {name}"
        if bad:
            out[f"merge/{key}/n_nonfinite"] = float(len(bad))
        if not vals:
            omitted[f"merge/{key}/mean"] = f"non-finite in all {len(bad)} modules"
            continue
        out[f"merge/{key}/mean"] = sum(vals) / len(vals)
        out[f"merge/{key}/min"] = min(vals)
        out[f"merge/{key}/max"] = max(vals)
        for name, m in modules.items():
            if _finite(m.get(key)):
                out[f"merge/module/{name}/{key}"] = float(m[key])
    for key, v in info.items():
        if _finite(v):
            out[f"merge/{key}"] = float(v)
        elif _number(v):
            omitted[f"merge/{key}"] = f"non-finite value {v!r}"
    return out, omitted


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _plot_spectra(modules: dict[str, dict], png: Path, run: Any) -> None:
    """Per-module generalized eigen-spectra (sst only: modules with an ``eigenvalues`` list)."""
    spectra = {n: m["eigenvalues"] for n, m in modules.items() if isinstance(m.get("eigenvalues"), list)}
    if not spectra:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for n, ev in spectra.items():
        ax.semilogy(range(1, len(ev) + 1), [max(v, 1e-12) for v in ev], lw=0.8, alpha=0.6)
    ax.set_xlabel("direction (sorted)")
    ax.set_ylabel("generalized eigenvalue  λ  (F_s v = λ (F_u + εI) v)")
    ax.set_title(f"SST eigen-spectra of {len(spectra)} modules")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    run.log_artifact(png, "plots")
    png.unlink()
