"""Base models: name resolution, module checks, quantization guard, loading for inference.

``tiny-world`` (and ``tiny-world-guard``) name the offline models the project builds itself
(``sst_lab.tinyworld``); ``smollm2-135m-instruct-q4`` names SmolLM2-135M-Instruct converted from its
GGUF by ``python -m sst_lab.smollm2`` (``sst_lab.smollm2``); a path ending in ``.gguf`` is converted
once into the cache; any other name is a local path or a Hugging Face model id.

Every adapter sst-lab writes carries ``sst_lab_base.json``: the base model's name and a
fingerprint of its weights. Loading an adapter onto a base whose weights differ (a rebuilt tiny
world at the same path, another revision of a hub model) is an error naming that file, not a
silent mismatch; an adapter without the file (made elsewhere) is loaded and reported unverified.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

BASE_RECORD = "sst_lab_base.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FULL_HASH_BYTES = 64 * 2**20  # smaller weight files are hashed whole
_CHUNK = 2**20
_N_CHUNKS = 32

TINY_ALIASES = ("tiny-world", "tiny-world-guard")
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelError(ValueError):
    """A model, adapter or module problem; the message names the field or path."""


def resolve_model_path(name: str) -> str:
    """``tiny-world`` aliases -> the built local folder; ``smollm2-135m-instruct-q4`` -> its converted
    folder (an error naming the fetch command when missing); a ``.gguf`` file -> its converted
    folder; anything else unchanged."""
    from sst_lab import smollm2

    if name == smollm2.NAME:
        return str(smollm2.require_smollm2())
    if name.endswith(".gguf"):
        return str(smollm2.ensure_gguf_converted(Path(name)))
    if name in TINY_ALIASES:
        from sst_lab.tinyworld import build_tiny_world

        world = build_tiny_world()
        return str(world.model if name == "tiny-world" else world.guard)
    return name


def local_model_dir(name: str, revision: str | None = None) -> Path:
    """The folder holding a model's files: an alias's build, a local path, or the hub cache."""
    path = Path(resolve_model_path(name))
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith((".", "~")):
        raise ModelError(f"model {name}: no such folder (a local path, not a hub id); was the model moved? "
                         "name it by its alias or new path (base_model)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, revision=revision, allow_patterns=["*.safetensors", "*.json"]))


def weights_fingerprint(name: str, revision: str | None = None) -> str:
    """sha256 over the model's weight files: names, sizes and contents (files over 64 MiB: their
    first MiB, which holds the safetensors header, and 32 evenly spaced 1 MiB chunks; two
    trainings or two revisions never share those bytes). Computed once per file version."""
    folder = local_model_dir(name, revision)
    files = sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    if not files:
        raise ModelError(f"model {name}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:".encode())
        h.update(_file_digest(str(f.resolve()), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()[:32]


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, _mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(8 * _CHUNK), b""):
                h.update(block)
        else:
            for i in range(_N_CHUNKS + 1):
                fh.seek(0 if i == 0 else (size - _CHUNK) * i // _N_CHUNKS)
                h.update(fh.read(_CHUNK))
    return h.hexdigest()


def write_base_record(adapter_dir: Path, base_model: str, revision: str | None = None) -> dict[str, str]:
    """Write ``sst_lab_base.json`` (base name + weights fingerprint) into an adapter folder."""
    record = {"base_model": base_model, "weights_fingerprint": weights_fingerprint(base_model, revision)}
    (Path(adapter_dir) / BASE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


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
    """Base model (+ optional PEFT adapter, kept unmerged) in eval mode, its tokenizer, and the
    tags that say which weights were loaded: ``base_weights_fingerprint`` and, with an adapter,
    ``adapter_base_verified`` (``false`` for an adapter without ``sst_lab_base.json``)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base_model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype != "auto" else "auto").to(device)
    tags = {"base_weights_fingerprint": weights_fingerprint(path)}
    if adapter_path is not None:
        from peft import PeftModel

        tags["adapter_base_verified"] = str(check_adapter_base(adapter_path, path) != "unverified").lower()
        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    return model, load_tokenizer(path), tags


def check_adapter_base(adapter_path: str, base_path: str) -> str:
    """An adapter must belong to the base model it is loaded onto: same name, and same weights when
    the adapter records them. Returns the base's fingerprint, or ``"unverified"`` for an adapter
    without ``sst_lab_base.json``."""
    cfg_file = Path(adapter_path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"adapter {adapter_path}: no adapter_config.json (not a PEFT adapter folder)")
    declared = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if declared and resolve_model_path(declared) != base_path and Path(declared).name != Path(base_path).name:
        raise ModelError(f"adapter {adapter_path} was trained on base model {declared!r}, "
                         f"not on {base_path!r} (base_model_name_or_path in {cfg_file})")
    record_file = Path(adapter_path) / BASE_RECORD
    if not record_file.is_file():
        return "unverified"
    recorded = json.loads(record_file.read_text()).get("weights_fingerprint")
    actual = weights_fingerprint(base_path)
    if recorded != actual:
        raise ModelError(f"adapter {adapter_path} was trained on other weights than those now at {base_path}: "
                         f"weights_fingerprint {recorded} in {record_file}, the base's is {actual} (a rebuilt or "
                         "updated base model); retrain the adapter or load the base it was trained on")
    return actual
