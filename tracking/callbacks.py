"""A Trainer callback that logs training metrics into the stage's own MLflow run.

HF's ``MLflowCallback`` would log every TrainingArguments field a second time as unprefixed
params (and drop over-long ones with a warning); sst-lab logs the resolved config itself, so the
trainer only reports metrics through this callback: ``train/loss``, ``train/learning_rate``,
``train/grad_norm``, ``train/tokens_per_second`` (from TRL's cumulative ``num_tokens``), and
whatever else the trainer logs, all prefixed ``train/``. Points are buffered and written in one
batch every ``--metrics_flush_seconds`` (and at the end, or when the run fails), with their own steps and
timestamps: writing at every step cost 12-18 % of the tiny world's throughput.
"""

from __future__ import annotations

import re
import time

from transformers import TrainerCallback

from sst_lab.tracking.run import StageRun


class StageMetricsCallback(TrainerCallback):
    def __init__(self, run: StageRun):
        self.metrics = run.metric_buffer()
        self._t0: float | None = None
        self._tokens0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._tokens0 = time.perf_counter(), 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {}
        for key, value in logs.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # non-numeric trainer log entries are not metrics; NaN/inf fail in log_metrics
            name = "train/" + re.sub(r"[^\w.\- /]", "_", key)  # the end-of-training "train_loss" stays apart from "loss"
            metrics[name] = float(value)
        tokens = logs.get("num_tokens")
        now = time.perf_counter()
        if tokens is not None and self._t0 is not None and now > self._t0:
            metrics["train/tokens_per_second"] = (float(tokens) - self._tokens0) / (now - self._t0)
            self._t0, self._tokens0 = now, float(tokens)
        # buffered: one store write every flush_seconds, and at the end of training (bench/bench_train.py)
        self.metrics.log(metrics, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.metrics.flush()
