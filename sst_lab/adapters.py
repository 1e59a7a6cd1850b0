"""Check an adapter folder before merge or evaluate reads it: complete, readable, finite.

An adapter sst-lab wrote is complete when its ``SST_LAB_DONE`` marker exists (written last by
``sst_lab.io.atomic_dir``) and it holds ``training_items.json`` (what evaluate's overlap check
reads). An adapter trained elsewhere has neither: it is accepted only when the user says so
(``trained_elsewhere``), and the stage then tags its run ``adapter_trained_elsewhere``.
In every case the config must parse, the weights file must exist and be readable, and every
tensor in it must be finite; an error names the adapter (run id or folder), the file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

from sst_lab.io import DONE_MARKER

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ITEMS_FILE = "training_items.json"


class AdapterFolderError(ValueError):
    """An adapter folder is incomplete, unreadable or holds non-finite weights."""


def describe(field_name: str, path: Path, run_id: str | None = None, stage: str | None = None) -> str:
    """How an error names an adapter: the run id for a run reference, else the folder."""
    if run_id:
        return f"{field_name} ({stage or 'upstream'} run {run_id}, artifact 'adapter')"
    return f"{field_name} ({path})"


def check_adapter_folder(path: str | Path, *, where: str, trained_elsewhere: bool = False) -> None:
    """Raise ``AdapterFolderError`` naming ``where`` and the file unless the folder is usable."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFolderError(f"{where}: {path} is not a folder")
    if not trained_elsewhere:
        if not (path / DONE_MARKER).is_file():
            raise AdapterFolderError(
                f"{where}: no {DONE_MARKER} marker: the folder was not completed by an sst-lab stage (interrupted "
                "or copied half-way). Re-run the stage; an adapter trained outside sst-lab needs trained_elsewhere")
        if not (path / ITEMS_FILE).is_file():
            raise AdapterFolderError(
                f"{where}: {ITEMS_FILE} is missing, so evaluation cannot refuse items it was trained on. Give "
                "trained_elsewhere only if the adapter really was trained outside sst-lab (the run is tagged so)")
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise AdapterFolderError(f"{where}: {CONFIG_FILE} is missing: not a PEFT adapter folder")
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFolderError(f"{where}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    check_weights(path / WEIGHTS_FILE, where=where)


def check_weights(weights: Path, *, where: str) -> None:
    """The safetensors file exists, parses, and every tensor in it is finite."""
    import torch
    from safetensors import safe_open

    if not weights.is_file():
        hint = " (found adapter_model.bin: re-save with safe_serialization=True)" if (
            weights.parent / "adapter_model.bin").exists() else ""
        raise AdapterFolderError(f"{where}: weights file {weights.name} is missing{hint}")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            bad = []
            for key in fh.keys():
                t = fh.get_tensor(key)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                    bad.append(f"{key} ({n_nan} NaN, {n_inf} Inf of {t.numel()})")
    except Exception as exc:  # noqa: BLE001  (safetensors raises SafetensorError, OSError, ...)
        raise AdapterFolderError(f"{where}: weights file {weights.name} cannot be read (truncated or corrupt?): "
                                 f"{type(exc).__name__}: {exc}") from None
    if bad:
        raise AdapterFolderError(f"{where}: weights file {weights.name} holds non-finite values in "
                                 f"{len(bad)} tensor(s): {'; '.join(bad[:5])}")
