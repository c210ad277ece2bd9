"""Metrics sinks: stdout, ``metrics.jsonl`` in the run directory, wandb, TensorBoard.

Only the logging rank (the last rank, on the last pipeline stage) writes. wandb runs offline
unless ``WANDB_API_KEY`` is set (or ``WANDB_MODE`` says otherwise); ``logging.wandb: false`` turns
it off. The JSONL file is the machine-readable record that tests and benchmarks read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from megatron_tst.config import RunConfig

log = logging.getLogger("megatron_tst")


# The terminal, the run's log file and which records go where: ``training/console.py``.
from megatron_tst.training.console import setup_logging  # noqa: E402,F401  (re-exported)


class MetricsLogger:
    def __init__(self, cfg: RunConfig, enabled: bool, resumed_step: int = 0):
        self.enabled = enabled
        self._wandb = self._tb = None
        self._jsonl = None
        if not enabled:
            return
        run_dir = Path(cfg.resolved_run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.logging.wandb:
            self._wandb = _start_wandb(cfg, run_dir)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_step)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)

    def log_at(self, step: int, metrics: dict[str, Any], kind: str) -> None:
        """Figures of an earlier ``step`` (downstream scores that arrive later): wandb's own step
        only grows, so they are plotted against ``<kind>/step`` there."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        self._jsonl.flush()
        scalars = {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.define_metric(f"{kind}/*", step_metric=f"{kind}/step")
            self._wandb.log({**scalars, f"{kind}/step": step})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)

    def event(self, step: int, message: str) -> None:
        """A marked event in the logs (resume, checkpoint, phase switch)."""
        log.info("step %d: %s", step, message)
        self.log(step, {"message": message}, kind="event")

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _start_wandb(cfg: RunConfig, run_dir: Path) -> Optional[Any]:
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: logging.wandb is ignored (pip install wandb)")
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.name, dir=str(run_dir),
                      config=cfg.to_dict(), mode=mode, resume="allow", id=_wandb_id(run_dir))


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed job continues the same wandb run (a damaged
    id file is replaced, with a warning: the run then starts a new wandb run)."""
    import re
    import uuid

    id_file = run_dir / "wandb_id.txt"
    try:
        run_id = id_file.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        run_id = None
    if run_id is not None and re.fullmatch(r"[0-9a-f]{12}", run_id):
        return run_id
    if id_file.exists():
        log.warning("%s is damaged: starting a new wandb run for this run directory", id_file)
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id


def format_metrics(step: int, total: int, m: dict[str, Any]) -> str:
    """The console line of a logged training step, e.g. ``step 20/300 | loss 5.1234 | lr
    3.000e-04 | grad 0.812 | data tok/s 12,345 | pos/s 3,086 | 0.413 s/step | 41.2 TFLOP/s/GPU
    | MFU 41.7% | mem 12.3 GiB (peak 15.0) | elapsed 0:01:02 | ETA 0:14:10``. Data tokens count
    ``s`` per position in the superposition phase; positions are what the model runs. Fields
    missing from ``m`` (or null) are left out."""
    from megatron_tst.training.perf import format_duration, format_number

    parts = [f"step {step}/{total}"]
    fields = (("loss", "loss {:.4f}"), ("lr", "lr {:.3e}"), ("grad_norm", "grad {:.3f}"),
              ("tokens_per_s", "data tok/s {:,.0f}"), ("positions_per_s", "pos/s {:,.0f}"),
              ("step_time_s", "{:.3f} s/step"))
    parts += [fmt.format(m[key]) for key, fmt in fields if m.get(key) is not None]
    if m.get("tflops_per_gpu") is not None:
        parts.append(f"{format_number(m['tflops_per_gpu'])} TFLOP/s/GPU")
    if m.get("mfu") is not None:
        parts.append(f"MFU {format_number(100 * m['mfu'])}%")
    for now, peak, label in (("mem_allocated_gib", "mem_peak_gib", "mem"),
                             ("rss_gib", "rss_peak_gib", "rss")):
        if m.get(now) is not None:
            parts.append(f"{label} {m[now]:.2f} GiB (peak {m[peak]:.2f})")
    for key, label in (("elapsed_s", "elapsed"), ("eta_s", "ETA")):
        if m.get(key) is not None:
            parts.append(f"{label} {format_duration(m[key])}")
    return " | ".join(parts)
