"""``checkpoint.init_from``: a new run's weights from a Hugging Face model or a checkpoint.

The CLI hands this module to the trainer (``Trainer(initializer=...)``), which calls ``check``
when the run starts fresh, then ``prepare`` and ``load`` on its model chunks.

Only a run that starts fresh uses it (no checkpoint to resume); a resumed run continues from its
own checkpoints and never reads it again. The run starts at step 0 with fresh optimizer state and
the recipe's schedule; only the model weights are taken.

- A megatron-tst checkpoint (a root or a step directory, e.g. what ``megatron-tst import``
  wrote) is checked like a resume (complete, its files' CRCs, shared by all ranks), its model
  keys and vocabulary against the recipe (one error listing every difference), then its weights
  are loaded in this run's layout through ``dist_checkpointing``.
- A Hugging Face directory is checked against the recipe (``export/hf_import.check_recipe``:
  model keys, vocabulary, tokenizer) on every rank before anything is written; then rank 0
  imports it once into ``<run_dir>/init_from`` (``megatron-tst import`` in a child process on the
  CPU: the whole model in one process, TP=1) while the others wait, and every rank loads it as
  above. A restart before the first save reuses that import when the model's files are
  unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch.distributed as dist

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.loader import config_to_yaml
from megatron_tst.plan import RunPlan

log = logging.getLogger(__name__)

KEY = "checkpoint.init_from"
IMPORTED = "init_from"  # under the run directory
#: The launcher's variables, which the import's child process must not see (it runs alone; with
#: TORCHELASTIC_USE_AGENT_STORE it would wait for torchrun's store as a client).
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                   "GROUP_WORLD_SIZE", "ROLE_NAME", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR",
                   "MASTER_PORT")  # and every TORCHELASTIC_*


@dataclass
class InitSource:
    """Where the weights come from: ``checkpoint`` (a step directory) once ``prepare`` ran;
    ``hf``: the Hugging Face directory it is imported from, if any."""

    given: str
    hf: Optional[object] = None  # export.hf_import.HFModel
    checkpoint: Optional[Path] = None

    def describe(self) -> str:
        return f"{self.given} (Hugging Face, imported to {self.checkpoint})" if self.hf \
            else str(self.checkpoint)


def check(cfg: RunConfig, plan: RunPlan) -> InitSource:
    """Every check that can refuse ``checkpoint.init_from`` (on every rank; nothing written)."""
    given = cfg.checkpoint.init_from
    path = Path(given)
    if path.is_dir() and (path / "config.json").is_file():
        from megatron_tst.export.hf_import import check_recipe, read_hf_dir

        hf = read_hf_dir(path, key=KEY)
        check_recipe(hf, cfg, plan.vocab_size, key=KEY)
        return InitSource(given, hf=hf)
    from megatron_tst.training.checkpoint import verified_on_all_ranks
    from megatron_tst.training.saved import open_checkpoint

    saved = open_checkpoint(given, key=KEY, verify=False)
    if problem := verified_on_all_ranks(saved):
        raise problem
    _check_saved_model(saved, cfg, plan)
    return InitSource(given, checkpoint=saved.path)


def _check_saved_model(saved, cfg: RunConfig, plan: RunPlan) -> None:
    from megatron_tst.config.schema import ModelConfig
    from megatron_tst.export.hf_import import resolved_model_keys, model_mismatches
    from megatron_tst.export.source import vocab_sizes

    model = {**vars(ModelConfig()), **saved.run_config.get("model", {})}
    expected = resolved_model_keys(SimpleNamespace(**model))
    vocab, padded = vocab_sizes(saved)
    expected["vocab_size"] = vocab
    problems = model_mismatches(expected, cfg.model, plan.vocab_size, f"{saved.path}")
    if not problems and padded != plan.padded_vocab_size:
        problems.append(
            f"the checkpoint's vocabulary is padded to {padded:,} rows and this run pads it to "
            f"{plan.padded_vocab_size:,} (model.make_vocab_size_divisible_by x TP); import the "
            f"model again with this recipe (megatron-tst import HF_DIR --out DIR --recipe "
            f"RECIPE), or give the Hugging Face directory itself")
    if problems:
        raise ConfigError(f"the recipe does not describe the model in {saved.path} "
                          f"({len(problems)} difference(s)): " + "; ".join(problems),
                          key=KEY, value=cfg.checkpoint.init_from)


def prepare(source: InitSource, cfg: RunConfig, rank: int) -> InitSource:
    """Import a Hugging Face source into ``<run_dir>/init_from`` (rank 0, reusing an unchanged
    earlier import; the other ranks wait); then ``source.checkpoint`` is the step to load."""
    if source.hf is None:
        return source
    out = Path(cfg.resolved_run_dir) / IMPORTED
    error = None
    if rank == 0 and not _reusable(out, source.hf):
        error = _run_import(source.hf.path, out, cfg)
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        raise ConfigError(f"importing {source.given} failed: {shared[0]}", key=KEY,
                          value=source.given)
    from megatron_tst.training.saved import find_checkpoint

    source.checkpoint = find_checkpoint(out, key=KEY)
    return source


def _reusable(out: Path, hf) -> bool:
    from megatron_tst.export.hf_import import IMPORT_INFO

    try:
        info = json.loads((out / IMPORT_INFO).read_text())
        return isinstance(info, dict) and info.get("source") == str(hf.path.resolve()) \
            and info.get("fingerprint") == hf.fingerprint()
    except (OSError, ValueError):
        return False


def _run_import(hf_dir: Path, out: Path, cfg: RunConfig) -> Optional[str]:
    """``megatron-tst import`` in a child process on the CPU; its error, or None."""
    log.info("importing %s into %s (one process, on the CPU)", hf_dir, out)
    env = {k: v for k, v in os.environ.items()
           if k not in DISTRIBUTED_ENV and not k.startswith("TORCHELASTIC_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_to_yaml(cfg))
    try:
        proc = subprocess.run([sys.executable, "-m", "megatron_tst.cli", "import", str(hf_dir),
                               "--out", str(out), "--recipe", f.name, "--force"],
                              env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit status {proc.returncode}"
    return None


def load(source: InitSource, chunks: list) -> None:
    """Load the weights of ``source.checkpoint`` into this rank's bare model chunks."""
    from megatron_tst.export.source import load_model_weights

    load_model_weights(source.checkpoint, chunks)
