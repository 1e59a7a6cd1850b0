"""LoRA adapter factors: read a PEFT adapter, plan a merge by module name, refactorise, write.

Model-free: only ``torch``, ``safetensors`` and JSON. A module's update is ``dW = scale * B @ A``
with ``A: [r, in]`` (``lora_A.weight``), ``B: [out, r]`` (``lora_B.weight``) and
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), where ``r`` and
``lora_alpha`` may be overridden per module by ``rank_pattern`` / ``alpha_pattern``.

Module names are the PEFT state-dict keys without the ``base_model.model.`` prefix and the
``.lora_A.weight`` suffix, e.g. ``model.layers.0.self_attn.q_proj``: the same names
``sst_lab.merge.fisher`` reports, and the keys patterns are matched against inside PEFT.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CONFIG_FILE = "adapter_config.json"
EXACT_RANK_RTOL = 1e-10  # singular values below this fraction of the largest are float64 rounding
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


class AdapterMismatchError(ValueError):
    """Two adapters cannot be merged module by module (base model, module set or shapes differ)."""


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA update ``scale * B @ A``."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scale: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ValueError(f"LoraFactors need 2-D A and B, got A{tuple(self.A.shape)} B{tuple(self.B.shape)}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"LoraFactors rank mismatch: A{tuple(self.A.shape)} vs B{tuple(self.B.shape)}")
        if not math.isfinite(self.scale):
            raise ValueError(f"LoraFactors scale must be finite, got {self.scale}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of ``dW``: ``(out, in)``."""
        return (self.B.shape[0], self.A.shape[1])

    def to(self, dtype: torch.dtype) -> LoraFactors:
        return LoraFactors(self.A.to(dtype), self.B.to(dtype), self.scale)

    def delta(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """``scale * B @ A`` in ``dtype`` (float64 by default, so sums of deltas stay exact)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(frozen=True)
class AdapterWeights:
    """A PEFT LoRA adapter read from disk; ``modules`` keeps the file's (sorted-key) order."""

    path: Path
    modules: dict[str, LoraFactors]
    base_model_name_or_path: str | None
    r: int
    alpha: float
    target_modules: Any
    config: dict[str, Any] = field(repr=False)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """Mirror ``peft.utils.other.get_pattern_key``: first key matching ``(.*\\.)?(key)$`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path}: invalid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: field 'peft_type' is {cfg.get('peft_type')!r}; only LORA adapters merge")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ValueError(f"{cfg_path}: field {key!r} must be a positive number, got {cfg.get(key)!r}")
    for key in ("use_dora", "lora_bias"):
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: field {key!r} is set; only plain LoRA (B @ A) updates can be merged")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ValueError(f"{cfg_path}: field {key!r} must be a mapping")
    return cfg


def read_adapter(path: str | Path) -> AdapterWeights:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` into per-module factors."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} not found")
    cfg = _load_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        hint = " (found adapter_model.bin: re-save with safe_serialization=True)" if (
            path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights_path} not found{hint}")
    state = load_file(str(weights_path))

    a_keys, b_keys, unexpected = {}, {}, []
    for key in state:
        if key.startswith(KEY_PREFIX) and key.endswith(_A_SUFFIX):
            a_keys[key[len(KEY_PREFIX):-len(_A_SUFFIX)]] = key
        elif key.startswith(KEY_PREFIX) and key.endswith(_B_SUFFIX):
            b_keys[key[len(KEY_PREFIX):-len(_B_SUFFIX)]] = key
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{weights_path}: keys that are not LoRA A/B factors (modules_to_save, embeddings, "
                         f"DoRA magnitudes cannot be merged here): {sorted(unexpected)[:10]}")
    unpaired = sorted(set(a_keys) ^ set(b_keys))
    if unpaired:
        raise ValueError(f"{weights_path}: modules with only one of lora_A/lora_B: {unpaired}")
    if not a_keys:
        raise ValueError(f"{weights_path}: no lora_A/lora_B weights found")

    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[str, LoraFactors] = {}
    for name in sorted(a_keys):
        A, B = state[a_keys[name]], state[b_keys[name]]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{weights_path}: module {name!r} has A{tuple(A.shape)} B{tuple(B.shape)}; "
                             "only linear LoRA layers ([r, in], [out, r]) are supported")
        r = int(_pattern_value(rank_pattern, name, cfg["r"]))
        if A.shape[0] != r:
            raise ValueError(f"{path / CONFIG_FILE}: module {name!r} has rank {A.shape[0]} in the weights but "
                             f"{r} from fields 'r'/'rank_pattern'")
        alpha = float(_pattern_value(alpha_pattern, name, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        modules[name] = LoraFactors(A, B, scale)
    return AdapterWeights(
        path=path, modules=modules, base_model_name_or_path=cfg.get("base_model_name_or_path"),
        r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), target_modules=cfg.get("target_modules"), config=cfg)


RULES = ("both", "utility_only", "safety_only")


@dataclass(frozen=True)
class ModulePair:
    name: str
    shape: tuple[int, int]  # shape of dW: (out, in)
    rank_utility: int       # 0 when the utility adapter does not adapt the module
    rank_safety: int        # 0 when the safety adapter does not adapt the module

    @property
    def rule(self) -> str:
        """``both``: the method merges the two updates; ``utility_only`` / ``safety_only``: one adapter
        adapts the module, the other's update there is zero (see ``merge/README.md``)."""
        return "both" if self.rank_utility and self.rank_safety else (
            "utility_only" if self.rank_utility else "safety_only")


@dataclass(frozen=True)
class MergePlan:
    """Module pairs resolved by name (the union of both adapters' modules), checked before any
    tensor is combined."""

    base_model_name_or_path: str | None
    pairs: tuple[ModulePair, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.pairs]

    def rules(self) -> dict[str, list[str]]:
        """Module names by rule (``both``, ``utility_only``, ``safety_only``)."""
        return {rule: [p.name for p in self.pairs if p.rule == rule] for rule in RULES}


def zero_factors(shape: tuple[int, int]) -> LoraFactors:
    """The update of an adapter that does not adapt a module: exactly zero, rank 1."""
    return LoraFactors(torch.zeros(1, shape[1]), torch.zeros(shape[0], 1), 1.0)


def plan_merge(utility: AdapterWeights, safety: AdapterWeights, *, utility_label: str | None = None,
               safety_label: str | None = None) -> MergePlan:
    """Pair modules by name over the union of both adapters' modules; raise
    ``AdapterMismatchError`` listing every real incompatibility (base model, dW shapes) at once.
    The labels name the adapters in errors (a run id rather than a download folder)."""
    u_label = utility_label or f"utility adapter {utility.path}"
    s_label = safety_label or f"safety adapter {safety.path}"
    problems = []
    if utility.base_model_name_or_path != safety.base_model_name_or_path:
        problems.append(f"base models differ: {u_label} was trained on {utility.base_model_name_or_path!r}, "
                        f"{s_label} on {safety.base_model_name_or_path!r}")
    pairs, bad_shapes = [], []
    for name in sorted(set(utility.modules) | set(safety.modules)):
        fu, fs = utility.modules.get(name), safety.modules.get(name)
        if fu is not None and fs is not None and fu.shape != fs.shape:
            bad_shapes.append(f"{name}: utility {fu.shape} vs safety {fs.shape}")
        pairs.append(ModulePair(name, (fu or fs).shape, fu.rank if fu else 0, fs.rank if fs else 0))
    if bad_shapes:
        problems.append(f"dW shapes differ between {u_label} and {s_label}: " + "; ".join(bad_shapes))
    if problems:
        raise AdapterMismatchError("cannot merge adapters:\n  " + "\n  ".join(problems))
    return MergePlan(utility.base_model_name_or_path, tuple(pairs))


def refactorise(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors of ``delta`` (truncated SVD, Eckart-Young).

    Returns ``(A [rank, in], B [out, rank], rel_error)`` with ``B @ A`` the truncation, the square
    root of the singular values folded into both factors symmetrically, and scale 1: write them
    with ``lora_alpha = rank`` and ``use_rslora = False`` (``write_adapter`` does). ``rel_error`` is
    ``||delta - B @ A||_F / ||delta||_F`` (0 for a zero delta), computed from the discarded
    singular values. Float64 throughout.
    """
    if delta.ndim != 2:
        raise ValueError(f"refactorise needs a 2-D delta, got shape {tuple(delta.shape)}")
    if not 1 <= rank <= min(delta.shape):
        raise ValueError(f"refactorise rank must be in [1, {min(delta.shape)}] for a delta of shape "
                         f"{tuple(delta.shape)}, got {rank}")
    U, S, Vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    total = S.square().sum()
    rel_error = float((S[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return A, B, rel_error


def exact_rank(S: Tensor, rtol: float = EXACT_RANK_RTOL) -> int:
    """Numerical rank of singular values ``S`` (descending): count above ``rtol * S[0]`` (0 for a zero matrix).

    ``rtol = 1e-10`` sits far above float64 rounding of the merged updates (~1e-16 relative) and far
    below float32 storage of the written factors (~1e-7), so what it drops is rounding, not update."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int((S > rtol * S[0]).sum())


def factorise_exact(delta: Tensor) -> tuple[Tensor, Tensor, float, int]:
    """Factors of ``delta`` at its exact (numerical) rank, at least 1: ``(A, B, rel_error, rank)``.

    A full-rank update (TIES, DARE) gets rank ``min(out, in)``: still exactly ``B @ A``."""
    if delta.ndim != 2:
        raise ValueError(f"factorise_exact needs a 2-D delta, got shape {tuple(delta.shape)}")
    S = torch.linalg.svdvals(delta.to(torch.float64))
    rank = max(1, exact_rank(S))
    A, B, err = refactorise(delta, rank)
    return A, B, err, rank


def write_adapter(out_dir: str | Path, modules: dict[str, tuple[Tensor, Tensor]], *,
                  base_model_name_or_path: str | None, rank: int | dict[str, int], template_config: dict[str, Any],
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write a PEFT-loadable LoRA adapter whose update per module is exactly ``B @ A``.

    ``modules`` maps module name -> ``(A [rank, in], B [out, rank])`` with scale 1 folded in (as
    ``refactorise`` returns). The config is ``template_config`` (e.g. the utility adapter's) with
    ``r = lora_alpha = rank`` (so PEFT's scale is 1), ``use_rslora``/DoRA off, no rank/alpha
    patterns and ``target_modules`` = the exact module names written (no layer filters), so PEFT
    wraps precisely these modules. ``rank`` may be a dict of per-module ranks (an exact merge whose
    modules have different exact ranks): then ``r = lora_alpha`` is the largest and every other
    module gets its own escaped ``rank_pattern`` / ``alpha_pattern`` entry (scale 1 everywhere).
    Weights are written first, the config last; make ``out_dir`` the temporary folder of
    ``sst_lab.io.atomic_dir`` to get an all-or-nothing output.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if (out_dir / CONFIG_FILE).exists() or (out_dir / WEIGHTS_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds an adapter; never overwritten")
    if not modules:
        raise ValueError("write_adapter: no modules to write")
    ranks = dict(rank) if isinstance(rank, dict) else dict.fromkeys(modules, rank)
    if set(ranks) != set(modules):
        raise ValueError(f"write_adapter: ranks given for {sorted(set(ranks) ^ set(modules))[:5]} do not match "
                         "the modules written")
    top = max(ranks.values())
    pattern = {re.escape(n): r for n, r in sorted(ranks.items()) if r != top}
    tensors = {}
    for name, (A, B) in modules.items():
        r = ranks[name]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"write_adapter: module {name!r} has A{tuple(A.shape)} B{tuple(B.shape)}, "
                             f"expected A [{r}, in] and B [out, {r}]")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"write_adapter: module {name!r} has non-finite factors")
        tensors[f"{KEY_PREFIX}{name}{_A_SUFFIX}"] = A.detach().to(dtype).contiguous()
        tensors[f"{KEY_PREFIX}{name}{_B_SUFFIX}"] = B.detach().to(dtype).contiguous()
    config = dict(template_config)
    config.update(
        peft_type="LORA", r=top, lora_alpha=top, use_rslora=False, use_dora=False, rank_pattern=pattern,
        alpha_pattern=dict(pattern), target_modules=sorted(modules), layers_to_transform=None, layers_pattern=None,
        base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
