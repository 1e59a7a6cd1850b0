"""Registry of merge methods: plain tensor functions with one signature.

    @merge_method("name", uses=("weights", ...))
    def fn(module: ModuleInputs, *, params: MethodParams) -> MethodResult

``MethodResult.delta`` is the merged ``dW`` (float64, ``[out, in]``) for one module, ``.stats``
JSON-ready numbers for the merge report. ``uses`` names the ``MethodParams`` fields a method reads;
``run_method`` rejects a non-default value of any other field (a ``k`` that changes nothing is an
error, not a silent no-op). No method ever falls back to another.

Every method works on the full updates ``dW = s * B @ A`` (never on A and B separately: the sum of
products is not the product of sums).
"""

from __future__ import annotations

import difflib
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from sst_lab.merge.lora import LoraFactors
from sst_lab.merge.diagnostics import spectrum_stats, subspace_stability
from sst_lab.merge.sst import (
    PROJECTIONS, core_delta, project_core, project_core_euclidean, solve_gevp, update_kept_fraction)


@dataclass(frozen=True)
class ModuleInputs:
    """Everything a method may use for one module."""

    name: str
    utility: LoraFactors
    safety: LoraFactors
    fisher_s: Tensor | None = None  # safety-data Fisher of the safety core: [r_s^2, r_s^2] (or [r_s^2] diag)
    fisher_u: Tensor | None = None  # utility-data Fisher of the safety core, same shape
    # (F_s, F_u) from two disjoint halves of the Fisher data (sst: subspace stability), optional
    fisher_halves: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.utility.shape != self.safety.shape:
            raise ValueError(f"module {self.name!r}: utility dW {self.utility.shape} and safety dW "
                             f"{self.safety.shape} differ")


@dataclass(frozen=True)
class MethodParams:
    """Parameters of all methods; each method reads only the fields it declares in ``uses``."""

    weights: tuple[float, float] = (1.0, 1.0)  # (utility, safety) for linear/cat/svd/ties/dare_*
    density: float | None = None  # ties, dare_*: fraction of entries kept, in (0, 1]
    ties_lambda: float = 1.0  # ties, dare_ties: scale of the disjoint mean
    seed: int = 0  # dare_*: random drop masks (mixed with the module name)
    rank: int | None = None  # svd: truncation rank
    k: int | None = None  # sst, sst_diag: directions / core entries kept, in [0, r_s^2]
    alpha: float = 1.0  # sst, sst_diag: scale of the projected safety update
    eps_rel: float = 1e-3  # sst, sst_diag: damping relative to the mean eigenvalue of F_u
    projection: str = "euclidean"  # sst: "euclidean" (Frobenius of dW) or "metric" (F_u + eps I, oblique)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))  # YAML gives lists
        if len(self.weights) != 2 or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"MethodParams.weights must be two finite numbers, got {self.weights!r}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"MethodParams.density must be in (0, 1], got {self.density}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"MethodParams.rank must be >= 1, got {self.rank}")
        if self.k is not None and self.k < 0:
            raise ValueError(f"MethodParams.k must be >= 0, got {self.k}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"MethodParams.projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.eps_rel < 0 or not math.isfinite(self.eps_rel):
            raise ValueError(f"MethodParams.eps_rel must be finite and >= 0, got {self.eps_rel}")
        for name in ("alpha", "ties_lambda"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"MethodParams.{name} must be finite")

    def non_default(self) -> set[str]:
        return {f.name for f in fields(self) if getattr(self, f.name) != f.default}


@dataclass(frozen=True)
class MethodResult:
    delta: Tensor  # merged dW, float64 [out, in]
    stats: dict[str, Any] = field(default_factory=dict)
    core: Tensor | None = None  # sst, sst_diag: the safety core M' (r x r) before alpha


MethodFn = Callable[..., MethodResult]


@dataclass(frozen=True)
class _Entry:
    fn: MethodFn
    uses: frozenset[str]


_REGISTRY: dict[str, _Entry] = {}


def merge_method(name: str, *, uses: tuple[str, ...] = ()) -> Callable[[MethodFn], MethodFn]:
    known = {f.name for f in fields(MethodParams)}
    unknown = set(uses) - known
    if unknown:
        raise ValueError(f"merge method {name!r} declares unknown params {sorted(unknown)}; known: {sorted(known)}")

    def register(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered (by {_REGISTRY[name].fn.__qualname__})")
        _REGISTRY[name] = _Entry(fn, frozenset(uses))
        return fn

    return register


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> _Entry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown merge method {name!r}{hint} Known methods: {available_methods()}")
    return _REGISTRY[name]


def run_method(name: str, module: ModuleInputs, params: MethodParams) -> MethodResult:
    """Look up ``name``, reject params it would ignore, run it, check the result."""
    entry = get_method(name)
    ignored = params.non_default() - entry.uses
    if ignored:
        raise ValueError(f"merge method {name!r} does not use {sorted(ignored)} (it reads {sorted(entry.uses)}); "
                         "remove them so the config says what the merge does")
    result = entry.fn(module, params=params)
    if tuple(result.delta.shape) != module.utility.shape:
        raise RuntimeError(f"merge method {name!r} returned shape {tuple(result.delta.shape)} for module "
                           f"{module.name!r}, expected {module.utility.shape}")
    if not torch.isfinite(result.delta).all():
        raise ValueError(f"merge method {name!r} produced NaN/Inf for module {module.name!r}")
    return result


# ---------------------------------------------------------------- helpers


def _deltas(module: ModuleInputs) -> tuple[Tensor, Tensor]:
    return module.utility.delta(torch.float64), module.safety.delta(torch.float64)


def _need(value: Any, field_name: str, method: str) -> Any:
    if value is None:
        raise ValueError(f"merge method {method!r} needs MethodParams.{field_name}")
    return value


def _generator(seed: int, module_name: str) -> torch.Generator:
    """Seeded per (seed, module name): masks do not depend on the order modules are merged in."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module_name.encode())) % 2**63)


def _trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ``round(density * numel)`` largest-magnitude entries."""
    n_keep = int(round(density * tau.numel()))
    if n_keep >= tau.numel():
        return tau.clone()
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    if n_keep > 0:
        mask[torch.topk(tau.abs().reshape(-1), n_keep).indices] = True
    return tau * mask.reshape(tau.shape)


def _dare(tau: Tensor, density: float, gen: torch.Generator) -> Tensor:
    """Drop each entry with probability ``1 - density``, rescale survivors by ``1 / density``."""
    keep = torch.rand(tau.shape, generator=gen, dtype=torch.float64) < density
    return tau * keep / density


def _disjoint_mean(taus: list[Tensor], scale: float) -> tuple[Tensor, float]:
    """TIES: sign by summed mass, mean over the entries agreeing with it, times ``scale``."""
    stack = torch.stack(taus)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0)
    merged = (stack * agree).sum(0) / count.clamp(min=1)
    conflict = float(((torch.sign(stack[0]) * torch.sign(stack[1])) < 0).double().mean())
    return scale * merged, conflict


def _fisher_pair(module: ModuleInputs, method: str) -> tuple[Tensor, Tensor]:
    if module.fisher_s is None or module.fisher_u is None:
        missing = [n for n, f in (("fisher_s", module.fisher_s), ("fisher_u", module.fisher_u)) if f is None]
        raise ValueError(f"merge method {method!r} needs Fisher blocks for module {module.name!r}; missing "
                         f"{missing} (compute them with sst_lab.merge.fisher.fisher_blocks)")
    return module.fisher_s, module.fisher_u


def _need_k(params: MethodParams, r: int, method: str) -> int:
    k = _need(params.k, "k", method)
    if k > r * r:
        raise ValueError(f"merge method {method!r}: k = {k} exceeds r_s^2 = {r * r}")
    return k


# ---------------------------------------------------------------- methods


@merge_method("linear", uses=("weights",))
def linear(module: ModuleInputs, *, params: MethodParams) -> MethodResult:
    """Task arithmetic: ``w_u dW_u + w_s dW_s``."""
    du, ds = _deltas(module)
    w_u, w_s = params.weights
    return MethodResult(w_u * du + w_s * ds)


@merge_method("cat", uses=("weights",))
def cat(module: ModuleInputs, *, params: MethodParams) -> MethodResult:
    """Concatenated factors ``[B_u, B_s] @ [w_u s_u A_u; w_s s_s A_s]``: exactly the linear sum at
    rank ``r_u + r_s``; checked against it (relative Frobenius difference in ``stats``)."""
    u, s = module.utility.to(torch.float64), module.safety.to(torch.float64)
    w_u, w_s = params.weights
    A = torch.cat([w_u * u.scale * u.A, w_s * s.scale * s.A], dim=0)
    B = torch.cat([u.B, s.B], dim=1)
    delta = B @ A
    reference = linear(module, params=params).delta
    ref_norm = float(reference.norm())
    diff = float((delta - reference).norm()) / ref_norm if ref_norm > 0 else float(delta.norm())
    if diff > 1e-9:
        raise RuntimeError(f"cat for module {module.name!r} differs from the linear sum by {diff:.2e} (relative)")
    return MethodResult(delta, {"rank": u.rank + s.rank, "rel_diff_vs_sum": diff})


@merge_method("svd", uses=("weights", "rank"))
def svd(module: ModuleInputs, *, params: MethodParams) -> MethodResult:
    """Linear sum, then its best rank-``rank`` approximation."""
    rank = _need(params.rank, "rank", "svd")
    total = linear(module, params=MethodParams(weights=params.weights)).delta
    if rank > min(total.shape):
        raise ValueError(f"svd: rank {rank} exceeds min{tuple(total.shape)} for module {module.name!r}")
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    delta = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    norm2 = float(S.square().sum())
    rel = (float(S[rank:].square().sum()) / norm2) ** 0.5 if norm2 > 0 else 0.0
    return MethodResult(delta, {"rank": rank, "rel_error": rel})


@merge_method("ties", uses=("weights", "density", "ties_lambda"))
def ties(module: ModuleInputs, *, params: MethodParams) -> MethodResult:
    """TIES on ``dW``: weight, trim each task vector to ``density`` by magnitude, elect signs by
    summed mass, disjoint mean, times ``ties_lambda``."""
    density = _need(params.density, "density", "ties")
    du, ds = _deltas(module)
    w_u, w_s = params.weights
    delta, conflict = _disjoint_mean([_trim(w_u * du, density), _trim(w_s * ds, density)], params.ties_lambda)
    return MethodResult(delta, {"sign_conflict_fraction": conflict})


@merge_method("dare_linear", uses=("weights", "density", "seed"))
def dare_linear(module: ModuleInputs, *, params: MethodParams) -> MethodResult:
    """DARE: random drop (prob ``1 - density``), rescale by ``1 / density``, weighted sum."""
    density = _need(params.density, "density", "dare_linear")
    du, ds = _deltas(module)
    gen = _generator(params.seed, module.name)
    w_u, w_s = params.weights
    return MethodResult(w_u * _dare(du, density, gen) + w_s * _dare(ds, density, gen))


@merge_method("dare_ties", uses=("weights", "density", "seed", "ties_lambda"))
def dare_ties(module: ModuleInputs, *, params: MethodParams) -> MethodResult:
    """DARE drop + rescale in place of TIES' magnitude trim, then sign election and disjoint mean."""
    density = _need(params.density, "density", "dare_ties")
    du, ds = _deltas(module)
    gen = _generator(params.seed, module.name)
    w_u, w_s = params.weights
    taus = [_dare(w_u * du, density, gen), _dare(w_s * ds, density, gen)]
    delta, conflict = _disjoint_mean(taus, params.ties_lambda)
    return MethodResult(delta, {"sign_conflict_fraction": conflict})


@merge_method("sst", uses=("k", "alpha", "eps_rel", "projection"))
def sst(module: ModuleInputs, *, params: MethodParams) -> MethodResult:
    """SST-Merge: ``dW_u + alpha * s B_s unvec(m') A_s`` with ``m'`` the projection of ``vec(I)`` onto
    the top-k generalized eigenvectors of (F_s, F_u + eps I): in the (F_u + eps I) metric
    (``projection = "metric"``) or in the Frobenius norm of the update (``"euclidean"``). Stats carry
    the diagnostics of ``merge.diagnostics`` (and subspace stability when ``fisher_halves`` is given)."""
    F_s, F_u = _fisher_pair(module, "sst")
    r = module.safety.rank
    if F_s.shape != (r * r, r * r) or F_u.shape != (r * r, r * r):
        raise ValueError(f"sst: module {module.name!r} needs [r^2, r^2] = [{r * r}, {r * r}] Fisher blocks, got "
                         f"F_s {tuple(F_s.shape)}, F_u {tuple(F_u.shape)}")
    k = _need_k(params, r, "sst")
    gevp = solve_gevp(F_s, F_u, params.eps_rel, module=module.name)
    if params.projection == "metric":
        M, metric_kept = project_core(gevp, k, r)
    else:
        M, _ = project_core_euclidean(gevp, k, module.safety)
        m_proj = M.reshape(-1)  # its fraction in the F_u metric (may exceed 1 here), for comparison
        P = F_u.to(torch.float64) + gevp.eps * torch.eye(r * r, dtype=torch.float64)
        metric_kept = (float(m_proj @ P @ m_proj) / gevp.m_metric_norm2) ** 0.5 if gevp.m_metric_norm2 > 0 else 0.0
    delta = module.utility.delta(torch.float64) + params.alpha * core_delta(module.safety, M)
    stats = {"k": k, "eps": gevp.eps, "eigenvalues": gevp.eigenvalues.tolist(),
             "kept_fraction": update_kept_fraction(module.safety, M), "metric_kept_fraction": metric_kept,
             **spectrum_stats(gevp, F_s, F_u, k, M, params.alpha)}
    if module.fisher_halves is not None:
        (s_a, u_a), (s_b, u_b) = module.fisher_halves
        V_a = solve_gevp(s_a, u_a, params.eps_rel, module=module.name + " (half a)").V
        V_b = solve_gevp(s_b, u_b, params.eps_rel, module=module.name + " (half b)").V
        stats.update(subspace_stability(V_a, V_b, k))
    return MethodResult(delta, stats, core=M)


@merge_method("sst_diag", uses=("k", "alpha", "eps_rel"))
def sst_diag(module: ModuleInputs, *, params: MethodParams) -> MethodResult:
    """Diagonal-Fisher variant (what the original system did, on A/B entries where a diagonal
    ratio is ill-defined), here in core space: ``lambda_j = F_s[j,j] / (F_u[j,j] + eps)`` with
    ``eps = eps_rel * mean(diag F_u)``; keep the top-k entries of ``vec(I)`` as a mask. Only the r
    diagonal entries of I are non-zero, so off-diagonal picks keep nothing; k = r^2 keeps I."""
    F_s, F_u = _fisher_pair(module, "sst_diag")
    r = module.safety.rank
    d_s = F_s.diagonal() if F_s.ndim == 2 else F_s
    d_u = F_u.diagonal() if F_u.ndim == 2 else F_u
    if d_s.shape != (r * r,) or d_u.shape != (r * r,):
        raise ValueError(f"sst_diag: module {module.name!r} needs Fisher diagonals of length r^2 = {r * r}")
    d_s, d_u = d_s.to(torch.float64), d_u.to(torch.float64)
    if not (torch.isfinite(d_s).all() and torch.isfinite(d_u).all()):
        raise ValueError(f"sst_diag: module {module.name!r} has NaN/Inf in its Fisher diagonal")
    k = _need_k(params, r, "sst_diag")
    eps = params.eps_rel * float(d_u.mean())
    denom = d_u + eps
    if not bool((denom > 0).all()):
        raise ValueError(f"sst_diag: module {module.name!r} has zero utility Fisher entries and eps = {eps}; "
                         "raise eps_rel")
    ratio = d_s / denom
    mask = torch.zeros(r * r, dtype=torch.float64)
    mask[torch.argsort(ratio, descending=True, stable=True)[:k]] = 1.0
    M = (mask * torch.eye(r, dtype=torch.float64).reshape(-1)).reshape(r, r)
    delta = module.utility.delta(torch.float64) + params.alpha * core_delta(module.safety, M)
    return MethodResult(delta, {
        "k": k, "eps": eps, "top_ratios": torch.sort(ratio, descending=True).values[:8].tolist(),
        "kept_fraction": update_kept_fraction(module.safety, M),
        "diagonal_entries_kept": int(mask.reshape(r, r).diagonal().sum()),
    }, core=M)
