"""Per-example gradients w.r.t. the safety adapter's r x r core, and empirical Fisher blocks.

With the safety update written ``s * B M A`` (``M = I``), the gradient of example i w.r.t. ``M`` is
``G_i = sum_t g_t u_t^T``: ``u_t = A x_t`` is ``lora_A``'s output and ``g_t = dL_i/du_t`` the
gradient arriving at ``lora_B``'s input (it contains the scaling ``s``). One batched forward
captures every ``u`` with a forward hook on ``lora_A[adapter]``; one backward of
``L = sum_i L_i`` gives every ``g`` (examples do not interact in a forward pass, so ``dL/du`` of
example i's tokens is ``dL_i/du``); one ``einsum`` per module gives all ``G_i``.

Implementation note: the gradients are taken with ``torch.autograd.grad(loss, [u, ...])`` rather
than ``loss.backward()`` plus tensor hooks on ``u``: same ``g``, but no parameter's ``.grad`` is
touched and no weight gradients are computed. A ``u`` that does not require grad (the first
adapted layer, when no parameter does) is replaced by an equal leaf that does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MODEL_PREFIX = "base_model.model."
REQUIRED_KEYS = ("input_ids", "attention_mask", "labels")


def lora_layers(model, adapter_name: str) -> dict[str, torch.nn.Module]:
    """LoRA layers of ``model`` that hold ``adapter_name``, keyed like ``lora.read_adapter`` keys."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            out[name.removeprefix(MODEL_PREFIX)] = module
    if not out:
        available = sorted(getattr(model, "peft_config", {}))
        raise ValueError(f"no LoRA layer holds adapter {adapter_name!r}; adapters on this model: {available}")
    return out


def activate_adapters(model, adapter_names: Sequence[str]) -> list[str]:
    """Make all ``adapter_names`` active at once (e.g. ``["utility", "safety"]``), frozen.

    Uses ``model.base_model.set_adapter(list)`` (``PeftModel.set_adapter`` takes one name only),
    then checks that every LoRA layer reports each adapter it holds as active. Verified in
    ``tests/test_merge_math.py::test_activate_adapters_sums_both``: logits with both adapters active
    equal those of the base model with ``W + dW_u + dW_s`` written into its weights.
    """
    names = list(adapter_names)
    loaded = set(getattr(model, "peft_config", {}))
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded on the model (loaded: {sorted(loaded)}); "
                         "load them with PeftModel.load_adapter first")
    model.base_model.set_adapter(names, inference_mode=True)
    from peft.tuners.lora import LoraLayer

    for lname, module in model.named_modules():
        if isinstance(module, LoraLayer):
            inactive = [n for n in names if n in module.lora_A and n not in module.active_adapters]
            if inactive or module.disable_adapters or module.merged:
                raise RuntimeError(f"layer {lname}: adapters {names} not all active (active: "
                                   f"{module.active_adapters}, disabled: {module.disable_adapters}, "
                                   f"merged: {module.merged})")
    return names


def validate_batch(batch: dict) -> None:
    """``input_ids``, ``attention_mask``, ``labels``: 2-D tensors of one shape, every example with a
    label token to predict (a label != -100 at a position >= 1: position 0 is never predicted)."""
    if not isinstance(batch, dict):
        raise ValueError(f"batch must be a dict with keys {list(REQUIRED_KEYS)}, got {type(batch).__name__}")
    for key in REQUIRED_KEYS:
        if key not in batch:
            raise ValueError(f"batch is missing key {key!r} (has {sorted(batch)}); the Fisher needs "
                             f"{list(REQUIRED_KEYS)} from the tokenised data")
        if not isinstance(batch[key], Tensor):
            raise ValueError(f"batch[{key!r}] must be a torch.Tensor, got {type(batch[key]).__name__}")
    shape = batch["input_ids"].shape
    if len(shape) != 2 or shape[0] == 0 or shape[1] < 2:
        raise ValueError(f"batch['input_ids'] must be [N >= 1, T >= 2], got {tuple(shape)}")
    for key in REQUIRED_KEYS[1:]:
        if batch[key].shape != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, batch['input_ids'] {tuple(shape)}")
    n_labels = ((batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] != 0)).sum(1)
    empty = torch.nonzero(n_labels == 0).flatten().tolist()
    if empty:
        raise ValueError(f"batch examples {empty} have no label token (labels all -100 or padding after "
                         "position 0); drop them or fix the label mask")


def per_example_core_grads(model, batch: dict, adapter_name: str, *, sample_labels: torch.Generator | None = None,
                           core: float = 1.0) -> dict[str, Tensor]:
    """``G_i`` for every example and every layer holding ``adapter_name``: ``{module: [N, r, r]}``.

    ``sample_labels``: instead of the data's labels, draw each label token from the model's own
    predictive distribution at that position (``softmax`` of the detached logits, with this
    generator), for the sampled ("true") Fisher; which positions carry a label is unchanged.
    ``core``: the core ``M = core * I`` the gradient is taken at, 1 (the trained adapter) or 0 (the
    adapter switched off, e.g. the utility adapter's own point): with 0 the hook feeds ``lora_B``
    a zero leaf ``z`` and ``G_i = sum_t (dL_i/dz_t) u_t^T`` is the gradient at ``M = 0``.

    Loss ``sum_i mean_{label tokens} NLL`` (labels shifted as in HF causal LMs, -100 ignored).
    Padding (right or left, with ``attention_mask``; pass ``position_ids`` in the batch for left
    padding) contributes nothing: masked tokens carry no loss and no real token attends to them,
    so their ``g`` is exactly zero. The model runs in eval mode for the call (LoRA dropout and any
    other dropout off, so ``u`` is exactly ``A x`` and ``G_i`` is deterministic); its previous
    mode is restored. Float32 results (upcast from bf16/fp16).
    """
    validate_batch(batch)
    layers = lora_layers(model, adapter_name)
    inactive = [n for n, m in layers.items() if adapter_name not in m.active_adapters]
    if inactive:
        raise ValueError(f"adapter {adapter_name!r} is not active in {len(inactive)} layers (e.g. {inactive[0]}); "
                         "call activate_adapters(model, [...]) first")
    if core not in (0.0, 1.0):
        raise ValueError(f"core must be 1 (trained adapter) or 0 (adapter off), got {core}")
    captured: dict[str, Tensor] = {}
    fed: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            if name in captured:
                raise RuntimeError(f"lora_A of {name} ran twice in one forward; per-example core grads "
                                   "assume each adapted module is called once")
            if core == 0.0:
                captured[name] = output.detach()
                zero = torch.zeros_like(output, requires_grad=True)
                fed[name] = zero
                return zero
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            captured[name] = fed[name] = output
            return output
        return hook

    was_training = model.training
    model.eval()
    try:
        for name, layer in layers.items():
            handles.append(layer.lora_A[adapter_name].register_forward_hook(make_hook(name)))
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        with torch.enable_grad():
            logits = model(**kwargs, use_cache=False).logits
            labels = batch["labels"] if sample_labels is None else sampled_labels(logits, batch, sample_labels)
            loss = per_example_loss(logits, labels, batch["attention_mask"]).sum()
            names = list(captured)
            missing = sorted(set(layers) - set(names))
            if missing:
                raise RuntimeError(f"lora_A[{adapter_name!r}] never ran in {missing[:5]}; is the adapter active?")
            grads = torch.autograd.grad(loss, [fed[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, g in zip(names, grads, strict=True):
        u = captured[name].detach().float()
        g = torch.zeros_like(u) if g is None else g.float()
        out[name] = torch.einsum("btr,bts->brs", g, u)
    return out


def sampled_labels(logits: Tensor, batch: dict, gen: torch.Generator) -> Tensor:
    """``labels`` with every label token replaced by a draw from ``softmax(logits)`` at the position
    predicting it (the logits at t-1 predict token t); -100 and padding stay as they are."""
    labels = batch["labels"].clone()
    target = (labels[:, 1:] != -100) & (batch["attention_mask"][:, 1:] != 0)
    probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)[target]
    draws = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(labels.device)
    shifted = labels[:, 1:]
    shifted[target] = draws
    return labels


def label_counts(batch: dict) -> Tensor:
    """``[N]`` number of label tokens (positions >= 1 with a label and attention) of each example."""
    return ((batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] != 0)).sum(1)


def per_example_loss(logits: Tensor, labels: Tensor, attention_mask: Tensor) -> Tensor:
    """``[N]`` mean next-token NLL over each example's label tokens (float32)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=-100, reduction="none").view(shift_labels.shape)
    count = (shift_labels != -100).sum(1)
    return nll.sum(1) / count


CURVATURES = ("empirical", "sampled")


@dataclass(frozen=True)
class FisherEstimate:
    """Fisher blocks ``{module: [r^2, r^2]}`` (or diagonals ``[r^2]``), float64, from ``n`` examples,
    and the same from the examples of even and of odd index (two disjoint halves, for stability)."""

    full: dict[str, Tensor]
    halves: tuple[dict[str, Tensor], dict[str, Tensor]]
    n: int
    curvature: str


def estimate_fisher(model, batches: Iterable[dict], adapter_name: str, *, curvature: str = "empirical",
                    seed: int = 0, diag: bool = False, core: float = 1.0) -> FisherEstimate:
    """Per module ``F = (1/N) sum_i w_i vec(G_i) vec(G_i)^T`` (``vec`` row-major, as ``sst``).

    ``empirical``: ``G_i`` with the data's labels, ``w_i = 1``. ``sampled``: ``G_i`` with labels
    drawn from the model (``sampled_labels``, generator seeded with ``seed``) and ``w_i = T_i``, the
    example's label-token count: for ``L_i = (1/T_i) sum_t l_t``, ``E[T_i G_i G_i^T] = (1/T_i)
    sum_t J_t^T (diag p_t - p_t p_t^T) J_t``, the Gauss-Newton matrix (= Hessian of ``L_i`` up to
    the terms in the network's second derivatives) of the core; see merge/README.md. Activate the
    adapters the Fisher should be taken at first; ``core`` as in ``per_example_core_grads``.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    gen = torch.Generator().manual_seed(seed) if curvature == "sampled" else None
    sums: list[dict[str, Tensor]] = [{}, {}]
    counts = [0, 0]
    n = 0
    for batch in batches:
        grads = per_example_core_grads(model, batch, adapter_name, sample_labels=gen, core=core)
        weight = label_counts(batch).to(torch.float64).cpu() if gen is not None else None
        parity = (torch.arange(batch["input_ids"].shape[0]) + n) % 2
        for name, G in grads.items():
            vec = G.reshape(G.shape[0], -1).to(torch.float64).cpu()
            if weight is not None:
                vec = vec * weight.sqrt()[:, None]
            for half in (0, 1):
                v = vec[parity == half]
                term = v.square().sum(0) if diag else v.T @ v
                sums[half][name] = sums[half][name] + term if name in sums[half] else term
        for half in (0, 1):
            counts[half] += int((parity == half).sum())
        n += batch["input_ids"].shape[0]
    if n == 0:
        raise ValueError(f"no batches given for the Fisher of adapter {adapter_name!r}")
    names = list(sums[0])
    r2 = sums[0][names[0]].shape[0]
    if n < r2:
        log.warning("Fisher of adapter %r from N = %d examples < r^2 = %d: each block has rank <= %d, the "
                    "damping eps decides the rest of the spectrum (see merge/README.md)", adapter_name, n, r2, n)
    zero = {name: torch.zeros_like(sums[0][name]) for name in names}
    full = {name: (sums[0][name] + sums[1].get(name, zero[name])) / n for name in names}
    halves = tuple({name: sums[h].get(name, zero[name]) / max(counts[h], 1) for name in names} for h in (0, 1))
    return FisherEstimate(full, halves, n, curvature)


def fisher_blocks(model, batches: Iterable[dict], adapter_name: str) -> dict[str, Tensor]:
    """Empirical Fisher ``F = (1/N) sum_i vec(G_i) vec(G_i)^T`` per module, ``[r^2, r^2]`` float64.

    ``vec`` is row-major (``G.reshape(-1)``), matching ``sst.project_core``. Activate the adapters
    the Fisher should be taken at (``activate_adapters(model, ["utility", "safety"])``) first.
    """
    return estimate_fisher(model, batches, adapter_name).full


def fisher_diag(model, batches: Iterable[dict], adapter_name: str) -> dict[str, Tensor]:
    """Diagonal of ``fisher_blocks`` (``[r^2]`` float64) without forming the blocks."""
    return estimate_fisher(model, batches, adapter_name, diag=True).full
