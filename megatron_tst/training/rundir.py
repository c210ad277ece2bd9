"""The run directory's own records (besides metrics and checkpoints): the resolved recipe.

``<run_dir>/run_config.yaml`` is the resolved config of the latest start of the run, written by
global rank 0 once the run has been set up (and any resume checked).
"""

from __future__ import annotations

from pathlib import Path

from megatron_tst.config import RunConfig
from megatron_tst.config.loader import config_to_yaml


def write_run_config(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.resolved_run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run_config.yaml"
    path.write_text(config_to_yaml(cfg))
    return path
