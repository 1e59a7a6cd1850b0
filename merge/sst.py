"""SST-Merge in core space: the exact generalized eigenproblem per module and the projection.

The safety update of a module is ``s * B_s @ M @ A_s`` with an r x r core ``M`` (``M = I`` is the
trained adapter); ``m = vec(M)`` (row-major, as ``Tensor.reshape(-1)``). With empirical Fishers
``F_s``, ``F_u`` (r^2 x r^2, from ``fisher.fisher_blocks``) we solve

    F_s v = lambda (F_u + eps I) v,   eps = eps_rel * trace(F_u) / r^2

exactly (Cholesky of ``F_u + eps I`` = L L^T, symmetric ``eigh`` of ``L^-1 F_s L^-T``, float64),
normalise ``V^T (F_u + eps I) V = I`` and project ``m`` onto the top-k eigenvectors in the
``(F_u + eps I)`` metric: ``m' = V_k V_k^T (F_u + eps I) m``. For k = r^2, ``V V^T = (F_u+eps I)^-1``,
so ``m' = m`` and the merge is exactly utility + safety. See ``merge/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sst_lab.merge.lora import LoraFactors


@dataclass(frozen=True)
class Gevp:
    """Solution of ``F_s v = lambda (F_u + eps I) v`` for one module."""

    eigenvalues: Tensor  # [r^2], float64, descending
    V: Tensor  # [r^2, r^2], float64, columns = eigenvectors, V^T (F_u + eps I) V = I
    eps: float  # absolute damping added to F_u
    metric_m: Tensor  # (F_u + eps I) vec(I), float64: what the projection multiplies
    m_metric_norm2: float  # vec(I)^T (F_u + eps I) vec(I)


def _check_fisher(F: Tensor, what: str, module: str) -> Tensor:
    if F.ndim != 2 or F.shape[0] != F.shape[1]:
        raise ValueError(f"module {module!r}: {what} must be a square matrix, got shape {tuple(F.shape)}")
    if not torch.isfinite(F).all():
        raise ValueError(f"module {module!r}: {what} contains NaN or Inf; recompute the Fisher "
                         "(check the data and the adapter weights for this module)")
    return F.to(torch.float64)


def solve_gevp(F_s: Tensor, F_u: Tensor, eps_rel: float, *, module: str = "?") -> Gevp:
    """Exact GEVP in float64; ``eps = eps_rel * mean eigenvalue of F_u = eps_rel * trace(F_u) / r^2``."""
    F_s = _check_fisher(F_s, "F_s (safety Fisher)", module)
    F_u = _check_fisher(F_u, "F_u (utility Fisher)", module)
    if F_s.shape != F_u.shape:
        raise ValueError(f"module {module!r}: F_s {tuple(F_s.shape)} and F_u {tuple(F_u.shape)} differ")
    if eps_rel < 0:
        raise ValueError(f"eps_rel must be >= 0, got {eps_rel}")
    n = F_u.shape[0]
    r = round(n ** 0.5)
    if r * r != n:
        raise ValueError(f"module {module!r}: Fisher size {n} is not r^2")
    F_s = 0.5 * (F_s + F_s.T)
    F_u = 0.5 * (F_u + F_u.T)
    eps = eps_rel * float(torch.trace(F_u)) / n
    P = F_u + eps * torch.eye(n, dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(P)
    if int(info) != 0:
        raise ValueError(f"module {module!r}: F_u + eps*I is not positive definite (eps = {eps:.3e}, "
                         f"eps_rel = {eps_rel}, trace(F_u) = {float(torch.trace(F_u)):.3e}); raise eps_rel "
                         "or use more utility examples (at least r^2 for a full-rank F_u)")
    # C = L^-1 F_s L^-T (symmetric), C = W diag(lam) W^T, V = L^-T W.
    X = torch.linalg.solve_triangular(L, F_s, upper=False)
    C = torch.linalg.solve_triangular(L, X.T, upper=False)
    C = 0.5 * (C + C.T)
    lam, W = torch.linalg.eigh(C)
    order = torch.argsort(lam, descending=True, stable=True)
    lam, W = lam[order], W[:, order]
    V = torch.linalg.solve_triangular(L.T, W, upper=True)
    m = torch.eye(r, dtype=torch.float64).reshape(-1)
    Pm = P @ m
    return Gevp(eigenvalues=lam, V=V, eps=eps, metric_m=Pm, m_metric_norm2=float(m @ Pm))


def project_core(gevp: Gevp, k: int, r: int) -> tuple[Tensor, float]:
    """``M' = unvec(V_k V_k^T (F_u + eps I) vec(I))`` and the kept fraction in the metric.

    The second value is ``||m'||_P / ||m||_P`` with ``P = F_u + eps I`` (in [0, 1]: the projection
    is P-orthogonal). The Frobenius ratio of the actual update, which can exceed 1 (README: the
    hazard), needs the factors: ``update_kept_fraction``.
    """
    n = gevp.V.shape[0]
    if r * r != n:
        raise ValueError(f"project_core: r = {r} but the GEVP has size {n} (expected r^2 = {r * r})")
    if not 0 <= k <= n:
        raise ValueError(f"project_core: k must be in [0, r^2 = {n}], got {k}")
    Vk = gevp.V[:, :k]
    coeffs = Vk.T @ gevp.metric_m  # P-coordinates of m along each eigenvector
    m_proj = Vk @ coeffs
    kept = float(coeffs.square().sum() / gevp.m_metric_norm2) ** 0.5 if gevp.m_metric_norm2 > 0 else 0.0
    return m_proj.reshape(r, r), kept


PROJECTIONS = ("metric", "euclidean")


def update_metric(safety: LoraFactors) -> Tensor:
    """``K`` with ``vec(M)^T K vec(M) = ||s B_s M A_s||_F^2`` (row-major vec): ``s^2 kron(B^T B, A A^T)``."""
    A, B = safety.A.to(torch.float64), safety.B.to(torch.float64)
    return safety.scale ** 2 * torch.kron(B.T @ B, A @ A.T)


def project_core_euclidean(gevp: Gevp, k: int, safety: LoraFactors) -> tuple[Tensor, float]:
    """Orthogonal projection of the safety *update* onto ``{s B_s unvec(V_k c) A_s}`` in the Frobenius
    norm of dW (Euclidean in weight space): ``m' = argmin_{x in span V_k} (x - m)^T K (x - m)``.

    A piece of the update: the kept fraction ``||dW'|| / ||dW_s|| <= 1`` (returned). k = r^2 spans
    the whole core space, so ``m' = m`` exactly; k = 0 gives 0. Solved by least squares on an
    orthonormal basis of span(V_k) against ``K^(1/2)`` (eigen-square-root: K may be singular)."""
    n = gevp.V.shape[0]
    r = safety.rank
    if r * r != n:
        raise ValueError(f"project_core_euclidean: safety rank {r} but the GEVP has size {n}")
    if not 0 <= k <= n:
        raise ValueError(f"project_core_euclidean: k must be in [0, r^2 = {n}], got {k}")
    m = torch.eye(r, dtype=torch.float64).reshape(-1)
    if k == 0:
        return torch.zeros(r, r, dtype=torch.float64), 0.0
    w, U = torch.linalg.eigh(update_metric(safety))
    root = U * w.clamp(min=0).sqrt()  # K = root @ root.T
    Q = torch.linalg.qr(gevp.V[:, :k]).Q
    X, y = root.T @ Q, root.T @ m
    c = torch.linalg.lstsq(X, y[:, None], driver="gelsd").solution[:, 0]
    m_proj = Q @ c
    full = float(y @ y)
    kept = (float((X @ c).square().sum()) / full) ** 0.5 if full > 0 else 0.0
    return m_proj.reshape(r, r), kept


def core_delta(safety: LoraFactors, M: Tensor) -> Tensor:
    """``s * B_s @ M @ A_s`` in float64."""
    A, B = safety.A.to(torch.float64), safety.B.to(torch.float64)
    return safety.scale * (B @ M.to(torch.float64) @ A)


def update_kept_fraction(safety: LoraFactors, M: Tensor) -> float:
    """``||s B_s M A_s||_F / ||s B_s A_s||_F`` via r x r Gram matrices (no out x in product)."""
    A, B = safety.A.to(torch.float64), safety.B.to(torch.float64)
    GA, GB = A @ A.T, B.T @ B
    M = M.to(torch.float64)

    def norm2(core: Tensor) -> float:
        return float(torch.trace(core.T @ GB @ core @ GA))

    full = norm2(torch.eye(M.shape[0], dtype=torch.float64))
    return (max(norm2(M), 0.0) / full) ** 0.5 if full > 0 else 0.0


def global_k_budget(spectra: dict[str, Tensor], k_total: int) -> dict[str, int]:
    """Split ``k_total`` directions over modules by the largest generalized eigenvalues overall.

    Generalized eigenvalues are ratios of safety to (damped) utility curvature, hence
    dimensionless and comparable across modules. Ties break by module name, then index, so the
    result does not depend on dict order.
    """
    sizes = {name: int(ev.numel()) for name, ev in spectra.items()}
    total = sum(sizes.values())
    if not 0 <= k_total <= total:
        raise ValueError(f"global_k_budget: k_total must be in [0, {total}] (sum of r^2 over "
                         f"{len(spectra)} modules), got {k_total}")
    entries = []
    for name in sorted(spectra):
        ev = spectra[name].to(torch.float64)
        if not torch.isfinite(ev).all():
            raise ValueError(f"global_k_budget: module {name!r} has non-finite eigenvalues")
        entries.extend((-float(v), name, i) for i, v in enumerate(ev.tolist()))
    entries.sort()
    k = dict.fromkeys(spectra, 0)
    for _, name, _ in entries[:k_total]:
        k[name] += 1
    return k
