"""Diagnostics of an SST merge: does the curvature model hold, and is the kept subspace decided by data?

Per module (pure tensor functions, float64):
- ``spectrum_stats``: eigengap ``lambda_k / lambda_{k+1}``, effective ranks (``exp`` of the entropy of
  the normalised spectrum, Roy & Vetterli 2007) of the GEVP spectrum, of ``F_s`` and of ``F_u``, how
  many of ``F_u``'s eigenvalues are below the damping ``eps`` (eps-dominated), what fraction of the
  kept core's energy lies along those directions, and the quadratic model's predicted change of the
  safety and utility losses for the merge step ``delta = vec(alpha M') - vec(I)``:
  ``0.5 delta^T F delta``;
- ``subspace_stability``: principal angles between the top-k spans of two GEVPs (two disjoint halves
  of the Fisher data).
With a model (``heldout_loss``): the mean NLL of held-out Fisher-data examples at the point the merge
step starts from (base + utility + safety) and at the merged model, so the predicted change can be
compared with the measured one (``curvature fidelity = predicted / measured``), and the gradient of that
loss with respect to each safety core at the step's start (``heldout_core_gradient``), for the
first-order term ``g^T delta`` of the second-order Taylor model ``g^T delta + 0.5 delta^T F delta``: away
from a minimum the first-order term can dominate, and the quadratic term alone then says little about
the curvature.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sst_lab.merge.sst import Gevp


def effective_rank(values: Tensor) -> float:
    """``exp(-sum p log p)`` with ``p = max(v, 0) / sum``: 1 for one direction, n for a flat spectrum."""
    v = values.to(torch.float64).clamp(min=0)
    total = float(v.sum())
    if total <= 0:
        return 0.0
    p = v[v > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def spectrum_stats(gevp: Gevp, F_s: Tensor, F_u: Tensor, k: int, core: Tensor, alpha: float) -> dict[str, Any]:
    """Per-module diagnostics of one SST projection (``core`` = the projected ``M'``, r x r)."""
    ev = gevp.eigenvalues
    n = ev.numel()
    r = core.shape[0]
    F_s, F_u = F_s.to(torch.float64), F_u.to(torch.float64)
    mu, U = torch.linalg.eigh(0.5 * (F_u + F_u.T))
    dominated = mu < gevp.eps
    m_proj = core.to(torch.float64).reshape(-1)
    energy = float(m_proj.square().sum())
    delta = alpha * m_proj - torch.eye(r, dtype=torch.float64).reshape(-1)
    out: dict[str, Any] = {
        "effective_rank_gevp": effective_rank(ev),
        "effective_rank_fisher_safety": effective_rank(torch.linalg.eigvalsh(0.5 * (F_s + F_s.T))),
        "effective_rank_fisher_utility": effective_rank(mu),
        "fisher_utility_eps_dominated_dims": int(dominated.sum()),
        "predicted_safety_loss_change": 0.5 * float(delta @ F_s @ delta),
        "predicted_utility_loss_change": 0.5 * float(delta @ F_u @ delta),
    }
    if energy > 0:
        out["core_in_eps_dominated"] = float((U[:, dominated].T @ m_proj).square().sum()) / energy
    if 0 < k < n and float(ev[k]) > 0:
        out["eigengap_at_k"] = float(ev[k - 1] / ev[k])
    return out


def subspace_stability(V_a: Tensor, V_b: Tensor, k: int) -> dict[str, float]:
    """Principal angles between span(V_a[:, :k]) and span(V_b[:, :k]) (Euclidean, after QR):
    ``subspace_overlap`` = mean cos^2 (1 = same span, about k / r^2 for random spans) and the largest
    angle in degrees. Empty for k = 0."""
    if k == 0:
        return {}
    Qa = torch.linalg.qr(V_a[:, :k].to(torch.float64)).Q
    Qb = torch.linalg.qr(V_b[:, :k].to(torch.float64)).Q
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1.0)
    return {"subspace_overlap": float(cos.square().mean()),
            "subspace_max_angle_deg": math.degrees(math.acos(float(cos.min())))}


def heldout_loss(model, batches: list[dict]) -> float:
    """Mean over examples of the per-example mean NLL (the loss the Fishers are taken of), no grad."""
    from sst_lab.merge.fisher import per_example_loss

    total, n = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                total += float(per_example_loss(logits, batch["labels"], batch["attention_mask"]).double().sum())
                n += batch["input_ids"].shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("heldout_loss: no held-out examples")
    return total / n


def heldout_core_gradient(model, batches: list[dict], adapter_name: str = "safety") -> dict[str, Tensor]:
    """Per module, ``dL/dM`` at the trained core ``M = I`` of ``L = heldout_loss(model, batches)`` (the
    mean over examples of their ``G_i`` with the data's labels), ``[r, r]`` float64, ``vec`` row-major
    as ``spectrum_stats``' ``delta``."""
    from sst_lab.merge.fisher import per_example_core_grads

    sums: dict[str, Tensor] = {}
    n = 0
    for batch in batches:
        for name, G in per_example_core_grads(model, batch, adapter_name).items():
            total = G.to(torch.float64).sum(0)
            sums[name] = sums[name] + total if name in sums else total
        n += batch["input_ids"].shape[0]
    if n == 0:
        raise ValueError("heldout_core_gradient: no held-out examples")
    return {name: total / n for name, total in sums.items()}


def first_order_change(grads: dict[str, Tensor], cores: dict[str, Tensor], alpha: float) -> float:
    """``sum over modules of <g, alpha M' - I>``: the first-order Taylor term of the merge step."""
    missing = sorted(set(cores) - set(grads))
    if missing:
        raise ValueError(f"first_order_change: no gradient for {len(missing)} merged modules (e.g. {missing[0]})")
    total = 0.0
    for name, M in cores.items():
        M = M.to(torch.float64)
        delta = alpha * M - torch.eye(M.shape[0], dtype=torch.float64)
        total += float((grads[name] * delta).sum())
    return total


def set_safety_cores(model, cores: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Replace each safety ``lora_B`` weight ``B`` by ``B @ (scale * M)`` so the safety update becomes
    ``s B (scale M) A``; returns the original weights for ``restore_safety_b``."""
    from sst_lab.merge.fisher import lora_layers

    layers = lora_layers(model, "safety")
    saved = {}
    with torch.no_grad():
        for name, M in cores.items():
            weight = layers[name].lora_B["safety"].weight
            saved[name] = weight.detach().clone()
            weight.copy_((weight.double() @ (scale * M.to(torch.float64))).to(weight.dtype))
    return saved


def restore_safety_b(model, saved: dict[str, Tensor]) -> None:
    from sst_lab.merge.fisher import lora_layers

    layers = lora_layers(model, "safety")
    with torch.no_grad():
        for name, weight in saved.items():
            layers[name].lora_B["safety"].weight.copy_(weight)


def fidelity(predicted: float, measured: float, min_measured: float = 1e-6) -> float | None:
    """``predicted / measured``, or None (omitted, not inf) when the measured change is below
    ``min_measured`` nats in magnitude."""
    return predicted / measured if abs(measured) >= min_measured else None
