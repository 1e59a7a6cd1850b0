"""Base models: name resolution, module checks, quantization guard, loading for inference.

``tiny-world`` (and ``tiny-world-guard``) name the offline models the project builds itself
(``sst_lab.tinyworld``); any other name is a local path or a Hugging Face model id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_ALIASES = ("tiny-world", "tiny-world-guard")
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelError(ValueError):
    """A model, adapter or module problem; the message names the field or path."""


def resolve_model_path(name: str) -> str:
    """``tiny-world`` aliases -> the built local folder; anything else unchanged."""
    if name in TINY_ALIASES:
        from sst_lab.tinyworld import build_tiny_world

        world = build_tiny_world()
        return str(world.model if name == "tiny-world" else world.guard)
    return name


def require_cuda_for_quantization(load_in_4bit: bool, load_in_8bit: bool) -> None:
    import torch

    if (load_in_4bit or load_in_8bit) and not torch.cuda.is_available():
        which = "load_in_4bit" if load_in_4bit else "load_in_8bit"
        raise ModelError(f"{which}: true asks for QLoRA (bitsandbytes quantization), which needs a CUDA GPU; "
                         "this machine has none. Use the non-QLoRA preset or run on a GPU machine.")


def linear_module_names(model_path: str, trust_remote_code: bool = False) -> list[str]:
    """Module names of the model built on the meta device (costs no memory, even for 14B)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_target_modules(model_path: str, targets: Any, field: str = "lora_target_modules") -> None:
    """Every requested LoRA target must name linear modules of the model."""
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return
    names = linear_module_names(model_path)
    wanted = [targets] if isinstance(targets, str) else list(targets)
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ModelError(f"{field}: {missing} not found in model {model_path}; its linear modules are {leaves}")


def load_tokenizer(model_path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_for_inference(base_model: str, adapter_path: str | None = None, *, dtype: str = "auto",
                       device: str | None = None):
    """Base model (+ optional PEFT adapter, kept unmerged) in eval mode, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base_model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype != "auto" else "auto").to(device)
    if adapter_path is not None:
        from peft import PeftModel

        check_adapter_base(adapter_path, path)
        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    return model, load_tokenizer(path)


def check_adapter_base(adapter_path: str, base_path: str) -> None:
    """An adapter must belong to the base model it is loaded onto."""
    import json

    cfg_file = Path(adapter_path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"adapter {adapter_path}: no adapter_config.json (not a PEFT adapter folder)")
    declared = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if declared and resolve_model_path(declared) != base_path and Path(declared).name != Path(base_path).name:
        raise ModelError(f"adapter {adapter_path} was trained on base model {declared!r}, "
                         f"not on {base_path!r} (base_model_name_or_path in {cfg_file})")
