"""Library code of the evaluate stage: plan (config, lineage, suites), check, run, log.

One protocol for every model (base, utility, safety, merged): load every suite's items and refuse
any item an upstream train run was trained on; generate / score with the model under test; unload
it; judge safety responses with the guard; then compute metrics and log everything at once, so a
failure anywhere leaves a FAILED run with an error and no partial results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sst_lab.config import ConfigError
from sst_lab.evaluate.judges import GUARD_JUDGE, KEYWORD_JUDGE, RUBRIC_JUDGE, TEMPLATE_JUDGE
from sst_lab.evaluate.splits import SPLITS
from sst_lab.evaluate.suites import MAX_EMPTY_RATE, LoadedSuite, SuiteSpec, caveat_tags, classifier_warnings, load_suite

PRESETS = ("full", "minimal")
ROLES = ("base", "utility", "safety", "merged", "other")
ADAPTER_STAGES = ("train", "merge")


class TrainingOverlapError(ValueError):
    """An evaluation item was trained on by an upstream train run."""


@dataclass
class EvaluateArguments:
    """What to evaluate (model, adapter, suites) and how much of each suite."""

    model: str | None = field(default=None, metadata={
        "help": "Base model (path, hub id or tiny-world); default: the adapter run's base_model tag."})
    adapter: str | None = field(default=None, metadata={
        "help": "Adapter folder, or the MLflow run id of a train or merge run (artifact 'adapter')."})
    role: str | None = field(default=None, metadata={
        "help": f"{' | '.join(ROLES)}; default: base without adapter, else the upstream run's role tag."})
    suites: list[str] = field(default_factory=list, metadata={
        "help": "Suite names (configs/evaluate/suites/<name>.yaml) or YAML paths."})
    guard_model: str | None = field(default=None, metadata={
        "help": "Guard judge model (id, path or tiny-world-guard); needed by suites with the guard judge."})
    classifier_model: str | None = field(default=None, metadata={
        "help": "Classifier judge model (id or path, e.g. cais/HarmBench-Llama-2-13b-cls); for suites with judge classifier."})
    classifier_template: str | None = field(default=None, metadata={
        "help": "Classifier judge prompt template file ({behavior}, {generation}[, {context}])."})
    rubric_model: str | None = field(default=None, metadata={
        "help": "StrongREJECT rubric grader (any chat model: id or path); for suites with judge strongreject_rubric."})
    rubric_template: str | None = field(default=None, metadata={
        "help": "Rubric grader template file ({forbidden_prompt}, {response}); the user turn."})
    rubric_system_template: str | None = field(default=None, metadata={
        "help": "Optional rubric grader system-prompt file (no fields)."})
    rubric_max_new_tokens: int = field(default=512, metadata={"help": "Tokens the rubric grader may write."})
    max_rubric_unparsed_rate: float = field(default=MAX_EMPTY_RATE, metadata={
        "help": "A suite whose share of unparsed rubric-grader replies exceeds this is marked invalid "
                "(as max_empty_rate); unparsed items are never scored."})
    split: str = field(default="all", metadata={
        "help": "all | validation (choose settings here) | test (report chosen settings); see evaluate/splits.py."})
    preset: str = field(default="full", metadata={"help": "full (all items) | minimal (first minimal_n items)."})
    minimal_n: int = field(default=8, metadata={"help": "Items per suite with preset=minimal."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per batch (generation and letter scoring)."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto | float32 | bfloat16 | float16."})
    static_cache: bool = field(default=False, metadata={"help": "Static KV cache in generate (GPU + compile)."})
    seed: int = field(default=0, metadata={"help": "Recorded and set (greedy decoding does not sample)."})
    context_policy: str = field(default="error", metadata={
        "help": "Prompts that do not fit the model's context: error (default) | skip (left out, count logged)."})
    calibration_runs: list[str] = field(default_factory=list, metadata={
        "help": "Calibrate run ids of the judges used; a judge not listed links its latest FINISHED calibration."})
    max_empty_rate: float = field(default=MAX_EMPTY_RATE, metadata={
        "help": "A generation suite whose share of empty or degenerate responses (no letter or digit) exceeds "
                "this is marked invalid (tag invalid_suites, metric <suite>/valid = 0); compare refuses it."})
    trained_elsewhere: bool = field(default=False, metadata={
        "help": "Accept an adapter folder without the SST_LAB_DONE marker or training_items.json (trained "
                "outside sst-lab; no training-overlap check is possible); the run is tagged so."})
    run_name: str | None = field(default=None, metadata={"help": "MLflow run name (default: derived)."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Local copy of tables and metrics (default outputs/<study>/<run_name>-<run id>)."})

    def __post_init__(self):
        if self.context_policy not in ("error", "skip"):
            raise ConfigError(f"context_policy must be error or skip, got {self.context_policy!r}")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.role is not None and self.role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {self.role!r}")
        for name in ("minimal_n", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.suites:
            raise ConfigError("suites: give at least one suite (name or YAML path)")
        for name in ("max_empty_rate", "max_rubric_unparsed_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.rubric_max_new_tokens < 1:
            raise ConfigError(f"rubric_max_new_tokens must be a positive integer, got {self.rubric_max_new_tokens}")
        if len(set(self.suites)) != len(self.suites):
            raise ConfigError(f"suites: listed twice: {sorted({s for s in self.suites if self.suites.count(s) > 1})}")


@dataclass
class Plan:
    args: EvaluateArguments
    base_model: str
    adapter: Any               # tracking.lineage.Upstream | None
    role: str
    suites: list[SuiteSpec]
    tags: dict[str, Any]
    config: dict[str, Any]
    config_for_id: dict[str, Any]
    run_name: str


def _base_from_adapter_folder(path: Path) -> str | None:
    cfg = path / "adapter_config.json"
    return json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.is_file() else None


def _without_source(spec: dict[str, Any]) -> dict[str, Any]:
    """The suite definition without its file location (which differs between checkouts)."""
    return {k: v for k, v in spec.items() if k != "source"}


def plan_evaluation(args: EvaluateArguments, tracking: Any, work: Path) -> Plan:
    """Resolve the adapter's lineage, the base model, the role and the suites (no model loading)."""
    from sst_lab.adapters import ITEMS_FILE
    from sst_lab.config import to_dict
    from sst_lab.io import is_complete
    from sst_lab.redact import redact
    from sst_lab.tracking.lineage import lineage_ids, resolve
    from sst_lab.tracking.run import TrackingError

    adapter = None
    if args.adapter:
        adapter = resolve(args.adapter, artifact_path="adapter", expect_stage=None, dst=work / "adapter",
                          tracking_uri=tracking.tracking_uri, field_name="adapter")
        if adapter.run_id is not None and adapter.tags.get("stage") not in ADAPTER_STAGES:
            raise TrackingError(f"adapter: run {adapter.run_id} is a {adapter.tags.get('stage')!r} run; "
                                f"give a {' or '.join(ADAPTER_STAGES)} run")
    base = args.model or (adapter.tags.get("base_model") if adapter else None) \
        or (_base_from_adapter_folder(adapter.path) if adapter else None)
    if not base:
        raise ConfigError("model: required (no adapter run tag or adapter_config.json names a base model)")
    role = args.role or ("base" if adapter is None else adapter.tags.get("role"))
    if role not in ROLES:
        raise ConfigError(f"role: not given and the adapter has no usable role tag ({role!r}); "
                          f"give --role ({' | '.join(ROLES)})")
    suites = [load_suite(ref) for ref in args.suites]
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise ConfigError(f"suites: two suites share a name: {names}")
    guarded = [s.name for s in suites if GUARD_JUDGE in s.judges]
    if guarded and not args.guard_model:
        raise ConfigError(f"guard_model: suites {guarded} use the guard judge; give guard_model "
                          "(e.g. tiny-world-guard or meta-llama/Llama-Guard-3-8B)")
    judges = [KEYWORD_JUDGE] if any(s.kind in ("safety", "overrefusal") for s in suites) else []
    if guarded:
        judges.append(f"{GUARD_JUDGE}:{args.guard_model}")
    classified = [s.name for s in suites if TEMPLATE_JUDGE in s.judges]
    template_tags: dict[str, str] = {}
    if classified:
        if not (args.classifier_model and args.classifier_template):
            raise ConfigError(f"classifier_model, classifier_template: suites {classified} use the classifier "
                              "judge; give both (a model and its prompt template file)")
        from sst_lab.evaluate.judges import read_template

        sha = read_template(args.classifier_template)[1]
        judges.append(f"{TEMPLATE_JUDGE}:{args.classifier_model}+template@{sha[:12]}")
        from sst_lab.evaluate.judges import template_origin

        template_tags = {"classifier_template_sha256": sha, "classifier_template_origin": template_origin(sha)}
    elif args.classifier_model or args.classifier_template:
        raise ConfigError("classifier_model/classifier_template: given, but no suite uses the classifier judge")
    graded = [s.name for s in suites if RUBRIC_JUDGE in s.judges]
    if graded:
        if not (args.rubric_model and args.rubric_template):
            raise ConfigError(f"rubric_model, rubric_template: suites {graded} use the {RUBRIC_JUDGE} judge; give "
                              "both (a chat model and the rubric template file)")
        from sst_lab.evaluate.rubric import RubricFiles

        files = RubricFiles.read(args.rubric_template, args.rubric_system_template)
        judges.append(f"{RUBRIC_JUDGE}:{args.rubric_model}+template@{files.template_sha256[:12]}")
        template_tags.update(files.tags())
        note = files.describe(args.rubric_model)
        suites = [replace(s, caveats=(*s.caveats, note)) if s.name in graded else s for s in suites]
    elif args.rubric_model or args.rubric_template or args.rubric_system_template:
        raise ConfigError(f"rubric_model/rubric_template/rubric_system_template: given, but no suite uses the "
                          f"{RUBRIC_JUDGE} judge")

    config = redact({"evaluate": to_dict(args), "tracking": to_dict(tracking),
                     "suites": {s.name: _without_source(s.to_dict()) for s in suites}})
    for_id = {**config, "evaluate": {**config["evaluate"],
                                     "adapter": adapter.identity if adapter is not None else None}}
    tags = {"base_model": base, "role": role, "seed": args.seed, "preset": args.preset, "split": args.split,
            "sample_size": adapter.tags.get("sample_size", "none") if adapter is not None else "none",
            "upstream_run_ids": ",".join(lineage_ids(adapter)) or "none",
            "adapter_run_id": adapter.run_id if adapter is not None and adapter.run_id else "none",
            "suites": ",".join(s.label for s in suites), "judges": ",".join(judges) or "none",
            **caveat_tags(suites), **template_tags}
    if adapter is not None and args.trained_elsewhere and not (
            is_complete(adapter.path) and (Path(adapter.path) / ITEMS_FILE).is_file()):
        tags["adapter_trained_elsewhere"] = "true"
    # stage, role, merge setting and split first: the MLflow UI cuts long names
    setting = (adapter.tags.get("merge_setting") or adapter.tags.get("merge_method")) if adapter is not None else None
    lead = "-".join(x for x in (role, setting, None if args.split == "all" else args.split) if x)
    run_name = args.run_name or f"eval-{lead}-{Path(base).name}-{args.preset}-s{args.seed}"
    return Plan(args=args, base_model=base, adapter=adapter, role=role, suites=suites, tags=tags,
                config=config, config_for_id=for_id, run_name=run_name)


def _calibration_links(suites: list[SuiteSpec], args: EvaluateArguments, tracking_uri: str | None) -> dict[str, str]:
    from sst_lab.evaluate.calibration import calibration_tags, guard_judge_id, keyword_judge_id

    ids = {}
    if any(s.kind in ("safety", "overrefusal") for s in suites):
        ids[KEYWORD_JUDGE] = keyword_judge_id()
    if any(GUARD_JUDGE in s.judges for s in suites):
        ids[GUARD_JUDGE] = guard_judge_id(args.guard_model)
    if any(TEMPLATE_JUDGE in s.judges for s in suites):
        from sst_lab.evaluate.calibration import template_judge_id

        ids[TEMPLATE_JUDGE] = template_judge_id(args.classifier_model, args.classifier_template)
    if any(RUBRIC_JUDGE in s.judges for s in suites):
        from sst_lab.evaluate.calibration import rubric_judge_id

        ids[RUBRIC_JUDGE] = rubric_judge_id(args.rubric_model, args.rubric_template, args.rubric_system_template)
    return calibration_tags(ids, args.calibration_runs, tracking_uri)


# ------------------------------------------------------------------------------ training overlap
def training_records(adapter: Any, tracking_uri: str | None, work: Path) -> list[tuple[str, list[dict]]]:
    """``(source, [{id, prompt_sha}])`` for the adapter folder and every train run in its lineage."""
    from sst_lab.tracking.lineage import lineage_ids
    from sst_lab.tracking.run import TrackingError, resolve_tracking_uri

    if adapter is None:
        return []
    out = []
    own = Path(adapter.path) / "training_items.json"
    if own.is_file():
        where = (f"{adapter.tags.get('stage')} run {adapter.run_id}" if adapter.run_id else f"adapter {adapter.ref}")
        out.append((f"{where}, adapter/training_items.json", json.loads(own.read_text())))
    ids = [i for i in lineage_ids(adapter) if not (own.is_file() and i == adapter.run_id)]
    if ids:
        import mlflow

        uri = resolve_tracking_uri(tracking_uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        for rid in ids:
            if client.get_run(rid).data.tags.get("stage") != "train":
                continue
            try:
                local = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="adapter/training_items.json",
                                                            tracking_uri=uri, dst_path=str(work / f"items-{rid}"))
            except Exception as exc:  # noqa: BLE001  (MLflow raises several types for a missing artifact)
                raise TrackingError(f"train run {rid} (lineage of adapter {adapter.ref}) has no adapter/"
                                    f"training_items.json, so training overlap cannot be checked: {exc}") from exc
            out.append((f"train run {rid}, adapter/training_items.json", json.loads(Path(local).read_text())))
    return out


def check_training_overlap(loaded: list[LoadedSuite], records: list[tuple[str, list[dict]]]) -> None:
    """Refuse to score any item whose id or prompt_sha an upstream run trained on."""
    for source, items in records:
        ids = {str(i["id"]) for i in items}
        shas = {str(i["prompt_sha"]) for i in items}
        for suite in loaded:
            hits = [it.id for it in suite.items if it.id in ids or it.prompt_sha in shas]
            if hits:
                raise TrainingOverlapError(
                    f"suite {suite.spec.name}: {len(hits)} of its {len(suite.items)} items were trained on "
                    f"({source}; matched by id or prompt_sha): {hits[:10]}{' ...' if len(hits) > 10 else ''}. "
                    "Evaluate on held-out data.")


# ------------------------------------------------------------------------------ sharding
class Shards:
    """Split a list over ``accelerate`` processes, run ``fn`` on each part, gather in order."""

    def __init__(self):
        from accelerate import PartialState

        self.state = PartialState()

    @property
    def device(self) -> str:
        return str(self.state.device)

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def map(self, fn, items: list) -> list:
        if self.state.num_processes == 1:
            return fn(items)
        from accelerate.utils import gather_object

        with self.state.split_between_processes(items) as part:
            local = fn(list(part))
        return gather_object(local)


# ------------------------------------------------------------------------------ the run
@dataclass
class Outcome:
    metrics: dict[str, float]
    omitted: dict[str, str]
    rows: dict[str, list[dict]]
    output_dir: Path | None


def run_evaluation(plan: Plan, run: Any, tracking_uri: str | None, work: Path, study: str) -> Outcome:
    import torch

    from sst_lab.adapters import check_adapter_folder, describe
    from sst_lab.evaluate.engine import HFEngine
    from sst_lab.evaluate.judges import GuardJudge, TemplateJudge, preflight_guard
    from sst_lab.evaluate.rubric import RubricJudge, apply_rubric, preflight_grader
    from sst_lab.evaluate.splits import load_split
    from sst_lab.evaluate.suites import (apply_classifier, apply_guard, classifier_inputs, excluded_metrics,
                                         fit_context, infer, load_items, suite_metrics)
    from sst_lab.models import ModelError

    args = plan.args
    if args.output_dir and Path(args.output_dir).exists():
        raise FileExistsError(f"output_dir {args.output_dir} already exists; sst-lab never overwrites outputs: "
                              "choose another output_dir")
    if plan.adapter is not None:
        a = plan.adapter
        check_adapter_folder(a.path, where=describe("adapter", a.path, a.run_id, a.tags.get("stage")),
                             trained_elsewhere=args.trained_elsewhere)
    torch.manual_seed(args.seed)
    shards = Shards()
    t0 = time.perf_counter()
    limit = args.minimal_n if args.preset == "minimal" else None
    split_records = {}
    loaded = []
    for spec in plan.suites:
        suite, split_records[spec.name] = load_split(spec, args.split, limit, load_items)
        loaded.append(suite)
    check_training_overlap(loaded, training_records(plan.adapter, tracking_uri, work))
    guarded = [s for s in loaded if GUARD_JUDGE in s.spec.judges]
    if guarded:
        preflight_guard(args.guard_model)
    if any(RUBRIC_JUDGE in s.spec.judges for s in loaded):
        preflight_grader(args.rubric_model, f"template {args.rubric_template}")
    if run.enabled:  # which calibration of each judge this run relies on (tags calibration_run.<judge>)
        run.set_tags(_calibration_links(plan.suites, args, tracking_uri))

    seconds: dict[str, float] = {}
    try:
        engine = HFEngine.load(plan.base_model, str(plan.adapter.path) if plan.adapter else None, dtype=args.dtype,
                               device=shards.device, batch_size=args.batch_size, static_cache=args.static_cache)
    except ModelError as exc:
        raise ModelError(f"model {plan.base_model!r}, adapter {plan.adapter.ref if plan.adapter else None!r}: "
                         f"{exc}") from exc
    engine.check_finite()
    run.set_tags(engine.load_tags)
    fitted = [fit_context(suite, engine, args.context_policy) for suite in loaded]
    loaded = [f[0] for f in fitted]
    guarded = [s for s in loaded if GUARD_JUDGE in s.spec.judges]
    rows: dict[str, list[dict]] = {}
    for suite in loaded:
        t = time.perf_counter()
        rows[suite.spec.name] = shards.map(lambda part, s=suite: infer(replace(s, items=part), engine), suite.items)
        seconds[suite.spec.name] = time.perf_counter() - t
    engine.close()

    def judge_suites(suites: list[LoadedSuite], judge: Any, call: Any, apply: Any) -> None:
        """Judge every suite's rows with ``call(rows) -> verdicts`` (after the model under test is
        unloaded), record them with ``apply``, then unload the judge."""
        for suite in suites:
            t = time.perf_counter()
            suite_rows = rows[suite.spec.name]
            apply(suite_rows, shards.map(call, suite_rows), judge.label)
            seconds[suite.spec.name] += time.perf_counter() - t
        judge.engine.close()

    def on_replies(judge: Any) -> Any:
        return lambda part: judge.judge([r["prompt"] for r in part], [r["response"] for r in part])

    if guarded:
        judge = GuardJudge.load(args.guard_model, dtype=args.dtype, device=shards.device, batch_size=args.batch_size)
        judge_suites(guarded, judge, on_replies(judge), apply_guard)
    classified = [s for s in loaded if TEMPLATE_JUDGE in s.spec.judges]
    if classified:
        classifier = TemplateJudge.load(args.classifier_model, args.classifier_template, dtype=args.dtype,
                                        device=shards.device, batch_size=args.batch_size)

        def classify(part: list[dict]) -> list:
            behaviours, responses, contexts = classifier_inputs(part)
            return classifier.judge(behaviours, responses, contexts=contexts)

        judge_suites(classified, classifier, classify, apply_classifier)
    graded = [s for s in loaded if RUBRIC_JUDGE in s.spec.judges]
    if graded:
        grader = RubricJudge.load(args.rubric_model, args.rubric_template, args.rubric_system_template,
                                  dtype=args.dtype, device=shards.device, batch_size=args.batch_size,
                                  max_new_tokens=args.rubric_max_new_tokens)
        judge_suites(graded, grader, on_replies(grader), apply_rubric)

    metrics: dict[str, float] = {}
    omitted: dict[str, str] = {}
    for suite in loaded:
        m, o = suite_metrics(suite.spec, rows[suite.spec.name])
        metrics.update(m)
        omitted.update(o)
        metrics.update(excluded_metrics(suite))
        metrics[f"time/{suite.spec.name}/seconds"] = seconds[suite.spec.name]
    for _, context in fitted:
        metrics.update(context)
    metrics["time/total_seconds"] = time.perf_counter() - t0
    invalid = mark_validity(loaded, metrics, omitted, args.max_empty_rate, args.max_rubric_unparsed_rate)
    run.set_tags({"invalid_suites": ",".join(invalid) or "none", **classifier_warnings(metrics)})
    out_dir = None
    if run.enabled:
        _log(run, loaded, rows, metrics, omitted)
        for name, record in split_records.items():
            run.log_json(record.to_dict(), f"splits/{name}.json")
        out_dir = Path(args.output_dir or Path("outputs") / study / f"{plan.run_name}-{run.run_id[:8]}")
        _write_local(out_dir, loaded, rows, metrics, omitted)
    return Outcome(metrics=metrics, omitted=omitted, rows=rows, output_dir=out_dir)


def mark_validity(loaded: list[LoadedSuite], metrics: dict[str, float], omitted: dict[str, str],
                  max_empty_rate: float, max_rubric_unparsed_rate: float = MAX_EMPTY_RATE) -> list[str]:
    """``<group>/<suite>/valid`` (1/0) for every generation suite; the names of the invalid ones.

    A suite is invalid when its share of empty or degenerate responses exceeds ``max_empty_rate``
    (a broken model, NaN weights decode to nothing, must never read as "harmful rate 0"), or when
    its share of unparsed rubric-grader replies exceeds ``max_rubric_unparsed_rate`` (a grader that
    does not answer the rubric must never read as a StrongREJECT score). Of an invalid suite only
    ``n``, ``valid`` and the offending rates (+ intervals and counts) are logged; its other metrics
    move to ``omitted_metrics.json`` with the reason, so no aggregate or report can average them."""
    import sys

    invalid = []
    for suite in loaded:
        p = f"{suite.spec.group}/{suite.spec.name}"
        key = f"{p}/empty_rate"
        if key not in metrics:
            continue  # letter-scored (mmlu) or no items
        checks = [(key, max_empty_rate, "empty_rate", "max_empty_rate", "of its responses are empty or degenerate")]
        if f"{p}/rubric_unparsed_rate" in metrics:
            checks.append((f"{p}/rubric_unparsed_rate", max_rubric_unparsed_rate, "rubric_unparsed_rate",
                           "max_rubric_unparsed_rate", "of its rubric-grader replies are unparsed"))
        failed = [c for c in checks if metrics[c[0]] > c[1]]
        metrics[f"{p}/valid"] = float(not failed)
        if not failed:
            continue
        invalid.append(suite.spec.name)
        keep = {f"{p}/n", f"{p}/valid"} | {f"{k}{s}" for k, *_ in checks for s in ("", "_ci_low", "_ci_high")} \
            | ({f"{p}/rubric_n_unparsed", f"{p}/rubric_n_scored", f"{p}/rubric_n_empty"} if len(checks) > 1 else set())
        why = "; ".join(f"{name} {metrics[k]:.3f} > {limit_name} {limit}" for k, limit, name, limit_name, _ in failed)
        for name in [k for k in metrics if k.startswith(p + "/") and k not in keep]:
            del metrics[name]
            omitted[name] = f"suite invalid: {why} (see the per-item table)"
        for k, limit, _, limit_name, what in failed:
            print(f"[sst-lab] suite {suite.spec.name} is INVALID: {metrics[k]:.2f} {what} ({limit_name} {limit}); "
                  "compare refuses it", file=sys.stderr)
    return invalid


def _suite_record(suite: LoadedSuite) -> dict[str, Any]:
    return {**suite.spec.to_dict(), "data_path": str(suite.data_path), "data_sha256": suite.data_sha256,
            "n_scored": len(suite.items), "n_available": suite.n_available, "excluded": suite.excluded}


def _log(run: Any, loaded: list[LoadedSuite], rows: dict[str, list[dict]], metrics: dict[str, float],
         omitted: dict[str, str]) -> None:
    for suite in loaded:
        name = suite.spec.name
        run.log_dataset([{"id": i.id, "prompt": i.prompt, "prompt_sha": i.prompt_sha} for i in suite.items],
                        name=suite.spec.label, source=str(suite.data_path), context="eval")
        run.log_json(_suite_record(suite), f"suites/{name}.json")
        run.log_table(rows[name], f"tables/{name}.json")
    if omitted:
        run.log_json(omitted, "omitted_metrics.json")
    run.log_metrics(metrics)


def _write_local(out_dir: Path, loaded: list[LoadedSuite], rows: dict[str, list[dict]],
                 metrics: dict[str, float], omitted: dict[str, str]) -> None:
    from sst_lab.io import atomic_dir, write_json_atomic

    with atomic_dir(out_dir) as tmp:
        for suite in loaded:
            write_json_atomic(tmp / "tables" / f"{suite.spec.name}.json", rows[suite.spec.name])
            write_json_atomic(tmp / "suites" / f"{suite.spec.name}.json", _suite_record(suite))
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "omitted_metrics.json", omitted)
