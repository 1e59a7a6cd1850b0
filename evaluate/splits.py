"""Validation / test splits of an evaluation suite: disjoint by item id, deterministic, declared.

Hyper-parameters (SST's k and alpha, TIES' density, ...) are chosen on the ``validation`` items of
every suite and the chosen settings are scored on its ``test`` items, so no test number influences
a choice (tracking/select.py refuses test-split runs). A suite declares its rule under ``split:``::

    split: {method: hash, validation_fraction: 0.3, seed: 0}      # the default when absent
    split: {method: data, validation: {split: val}, test: {split: test}}   # the benchmark's own

``hash``: within each stratum (``EvalItem.stratum``: XSTest prompt type, HarmBench / JBB /
StrongREJECT category, none for the rest) the items are ordered by sha256(``<seed>:<item id>``)
and the first ``round(fraction * n_stratum)`` are validation, the rest test. The assignment of an
item depends only on its id, its stratum's members and the seed: not on file order.
``data``: each split is the suite's data with the given ``data`` keys replaced (MMLU ``val`` /
``test``). A part may add ``carve: N``: it is then the ``N`` items of its file that come first in
sha256(``<seed>:<item id>``) order (kept in file order), e.g. an SST-2 validation carved from the
*train* file while the test split is the whole GLUE dev::

    split: {method: data, validation: {path: "data:sst2/train.tsv", carve: 300}, test: {path: "data:sst2/dev.tsv"}}

The train stage excludes such a part from its candidate rows (``exclude_items_of:
[<suite>:validation]``, sst_lab.held_out), so evaluate's training-overlap check never meets
it. Both splits are loaded and any shared item id (or prompt) is an error.

``split=all`` (the evaluate stage's default) scores every item, as before splits existed. With a
limit (``preset: minimal``) a validation/test run scores the split's ``limit`` items that come
first in hash order (a sample across strata), ``all`` the file's first ``limit`` items (as before).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

SPLITS = ("all", "validation", "test")
METHODS = ("hash", "data")
_DATA_OVERRIDES = {"path", "format", "split", "subjects", "options"}
_PART_KEYS = _DATA_OVERRIDES | {"carve"}  # carve: N items of the part's file, first in hash order


class SplitError(ValueError):
    """A split declaration or its result is wrong; the message names the suite and field."""


@dataclass(frozen=True)
class SplitSpec:
    method: str = "hash"
    validation_fraction: float = 0.3
    seed: int = 0
    validation: dict = field(default_factory=dict, hash=False)  # method data: data-key overrides
    test: dict = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "validation_fraction": self.validation_fraction, "seed": self.seed,
                "validation": dict(self.validation), "test": dict(self.test)}


def parse_split(raw: Any, where: str) -> SplitSpec:
    """Validate a suite's ``split:`` mapping (``None``: the default hash rule)."""
    if raw is None:
        return SplitSpec()
    if not isinstance(raw, Mapping):
        raise SplitError(f"{where}: split must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"method", "validation_fraction", "seed", "validation", "test"}
    if unknown:
        raise SplitError(f"{where}: split: unknown key(s) {sorted(unknown)}")
    method = raw.get("method", "hash")
    if method not in METHODS:
        raise SplitError(f"{where}: split.method must be one of {METHODS}, got {method!r}")
    frac, seed = raw.get("validation_fraction", 0.3), raw.get("seed", 0)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise SplitError(f"{where}: split.validation_fraction must be in (0, 1), got {frac!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SplitError(f"{where}: split.seed must be an integer, got {seed!r}")
    parts = {}
    for name in ("validation", "test"):
        part = raw.get(name, {})
        if not isinstance(part, Mapping) or set(part) - _PART_KEYS:
            raise SplitError(f"{where}: split.{name} must map data keys {sorted(_DATA_OVERRIDES)} (or carve: N) "
                             f"to values, got {part!r}")
        carve = part.get("carve")
        if "carve" in part and (isinstance(carve, bool) or not isinstance(carve, int) or carve < 1):
            raise SplitError(f"{where}: split.{name}.carve must be a positive integer (items of its file), "
                             f"got {carve!r}")
        parts[name] = dict(part)
    if method == "data" and not (parts["validation"] and parts["test"]):
        raise SplitError(f"{where}: split.method data needs split.validation and split.test data overrides "
                         "(e.g. {split: val} and {split: test})")
    if method == "hash" and (parts["validation"] or parts["test"]):
        raise SplitError(f"{where}: split.validation/test overrides are only for method data")
    return SplitSpec(method=method, validation_fraction=float(frac), seed=seed, **parts)


def _rank(seed: int, item_id: str) -> str:
    return hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()


def hash_assign(items: list[Any], fraction: float, seed: int) -> dict[str, str]:
    """item id -> "validation" | "test", stratified by ``item.stratum`` (see the module docstring)."""
    strata: dict[Any, list[str]] = {}
    for it in items:
        strata.setdefault(getattr(it, "stratum", None), []).append(it.id)
    out: dict[str, str] = {}
    for ids in strata.values():
        ordered = sorted(ids, key=lambda i: _rank(seed, i))
        n_val = round(fraction * len(ordered))
        for j, item_id in enumerate(ordered):
            out[item_id] = "validation" if j < n_val else "test"
    return out


@dataclass
class SplitRecord:
    """What one run scored of one suite: logged as ``splits/<suite>.json``."""

    suite: str
    split: str
    rule: dict[str, Any]
    item_ids: list[str]
    n_validation: int
    n_test: int
    strata: dict[str, int]  # stratum -> items of this split (before any preset limit)

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "split": self.split, "rule": self.rule, "n_validation": self.n_validation,
                "n_test": self.n_test, "strata": self.strata, "item_ids": self.item_ids}


def _check_unique(items: list[Any], where: str) -> None:
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise SplitError(f"{where}: item ids are not unique ({dup}); a split by id needs unique ids")


def carve(items: list[Any], n: int, seed: int, where: str) -> list[Any]:
    """The ``n`` items first in sha256(``<seed>:<id>``) order, in file order (fewer than all, or an error)."""
    if n >= len(items):
        raise SplitError(f"{where}: carve {n} needs more than {n} items; the file has {len(items)}")
    first = {it.id for it in sorted(items, key=lambda it: _rank(seed, it.id))[:n]}
    return [it for it in items if it.id in first]


def _load_part(spec: Any, rule: SplitSpec, name: str, load_items, where: str) -> Any:
    overrides = dict(getattr(rule, name))
    n = overrides.pop("carve", None)
    part = load_items(replace(spec, data=replace(spec.data, **overrides)), None)
    _check_unique(part.items, f"{where}, split {name}")
    return part if n is None else replace(part, items=carve(part.items, n, rule.seed, f"{where}, split.{name}"))


def load_split(spec: Any, split: str, limit: int | None, load_items) -> tuple[Any, SplitRecord]:
    """Load ``spec``'s items of ``split`` (then the first ``limit``) with ``load_items(spec, limit)``."""
    if split not in SPLITS:
        raise SplitError(f"split must be one of {SPLITS}, got {split!r}")
    rule: SplitSpec = getattr(spec, "split", None) or SplitSpec()
    where = f"suite {spec.name} ({spec.source or 'no file'})"
    if rule.method == "data":
        parts = {name: _load_part(spec, rule, name, load_items, where) for name in ("validation", "test")}
        val_ids = {it.id for it in parts["validation"].items}
        val_shas = {it.prompt_sha for it in parts["validation"].items}
        shared = [it.id for it in parts["test"].items if it.id in val_ids or it.prompt_sha in val_shas]
        if shared:
            raise SplitError(f"{where}: validation and test share {len(shared)} items (by id or prompt): "
                             f"{shared[:5]}; fix split.validation / split.test")
        n_val, n_test = len(parts["validation"].items), len(parts["test"].items)
        chosen = parts[split] if split != "all" else load_items(spec, None)
    else:
        loaded = load_items(spec, None)
        _check_unique(loaded.items, where)
        assign = hash_assign(loaded.items, rule.validation_fraction, rule.seed)
        n_val = sum(v == "validation" for v in assign.values())
        n_test = len(assign) - n_val
        if split != "all" and (n_val == 0 or n_test == 0):
            raise SplitError(f"{where}: split {rule.to_dict()} leaves {n_val} validation and {n_test} test items "
                             f"of {len(assign)}; change split.validation_fraction")
        keep = loaded.items if split == "all" else [it for it in loaded.items if assign[it.id] == split]
        chosen = replace(loaded, items=keep)
    strata: dict[str, int] = {}
    for it in chosen.items:
        key = str(getattr(it, "stratum", None))
        strata[key] = strata.get(key, 0) + 1
    if limit is not None and split != "all":
        # a sample spread over the whole split (hash order), not the file's first items (which in
        # XSTest or MMLU would be the first prompt types / subjects only); kept in file order
        first = {it.id for it in sorted(chosen.items, key=lambda it: _rank(rule.seed, it.id))[:limit]}
        chosen = replace(chosen, items=[it for it in chosen.items if it.id in first])
    elif limit is not None:
        chosen = replace(chosen, items=chosen.items[:limit])
    record = SplitRecord(spec.name, split, rule.to_dict(), [it.id for it in chosen.items], n_val, n_test, strata)
    return chosen, record
