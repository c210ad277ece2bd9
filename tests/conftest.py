"""Shared fixtures: a synthetic indexed dataset with a real sentencepiece tokenizer, tiny recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while the dog ran far away and then it slept under "
         "an old tree near the river bank until morning came").split()


def pytest_configure(config):
    os.environ.setdefault("WANDB_MODE", "disabled")
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)) > 1:
        # One core per pytest worker (pytest.ini runs two): in-process megatron work must not
        # compete with the other worker's runs (the subprocess runs already use one thread).
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config, items):
    """``newest_line`` and ``oldest_line`` tests test the project's own logic (signals, faults,
    crash points, resume guards, retention, the study tool, downstream evaluation) through the
    single-process trainer, which every other test runs on both lines: they are in the default
    suite on one tested megatron-core line, the newest (the GPU image's, Python 3.12) or the
    oldest (Python 3.11), and slow tests on the other, keeping each CI leg's default suite
    short."""
    from packaging.version import Version

    from megatron_tst import mcore

    installed, tested = mcore.installed(), [Version(v) for v in mcore.TESTED.values()]
    for item in items:
        if (item.get_closest_marker("newest_line") and installed < max(tested)) or \
                (item.get_closest_marker("oldest_line") and installed > min(tested)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict:
    """train/valid indexed datasets of random word documents, EOD after each, and a tokenizer."""
    return make_synthetic_data(tmp_path_factory.mktemp("synthetic"))


def make_synthetic_data(root: Path) -> dict:
    """The ``synthetic_data`` files, written under ``root``."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(10, 120)))) for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(root / "tok"),
                                   vocab_size=96, model_type="bpe", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tok.model"))
    for split, part in (("train", docs[:270]), ("valid", docs[270:])):
        builder = IndexedDatasetBuilder(str(root / f"{split}.bin"), dtype=np.uint16)
        for doc in part:
            ids = sp.encode(doc) + [sp.eos_id()]
            builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
        builder.finalize(str(root / f"{split}.idx"))
    return {"root": root, "tokenizer": str(root / "tok.model"), "train": str(root / "train"),
            "valid": str(root / "valid"), "eod": sp.eos_id()}


def write_tiny_recipe(root: Path, synthetic_data: dict) -> Path:
    """A tiny model on the synthetic data (run_dir ``root/run``); tests override what they need."""
    recipe = {
        "base": str(REPO / "configs" / "demo-cpu.yaml"),
        "name": "tiny",
        "run_dir": str(root / "run"),
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 128, "seq_length": 32},
        "data": {"source": "indexed", "train_paths": [synthetic_data["train"]],
                 "valid_paths": [synthetic_data["valid"]],
                 "tokenizer": {"type": "sentencepiece", "path": synthetic_data["tokenizer"]}},
        "training": {"train_steps": 6, "micro_batch_size": 2, "global_batch_size": 4,
                     "eval_interval": 3, "eval_steps": 1, "log_interval": 1},
        "schedule": {"warmup_steps": 2, "decay_fraction": 0.5},
        "checkpoint": {"save_interval": 0},
        "logging": {"wandb": False},
        "tst": {"bag_size": 1, "ratio": None},  # standard training unless a test turns TST on
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def tiny_recipe(tmp_path, synthetic_data) -> Path:
    return write_tiny_recipe(tmp_path, synthetic_data)


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None,
            check: bool = True, cwd: Path = REPO):
    """Run ``megatron-tst`` in a fresh process (torchrun for nproc > 1) in ``cwd``; return the
    result."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_tst.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "megatron_tst.cli", *args]
    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    # Output goes to files and the command gets its own process group, killed at the end: a
    # process killed mid-run (the crash tests) leaves helper processes (megatron's checkpoint
    # writer) that would hold a pipe open.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=full_env, cwd=cwd,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def wait_for_step(run_dir: Path, step: int, procs: list, timeout: float = 300) -> None:
    """Until ``run_dir``'s metrics show ``step`` (a hang guard: ``timeout`` seconds), while every
    process of ``procs`` (Popen) still runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, f"a process exited early ({p.returncode})"
        try:
            if any(r["step"] >= step for r in read_metrics(run_dir)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {run_dir} after {timeout} s")


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_env():
    """One-rank gloo group and megatron parallel_state in this pytest process (TP=PP=1)."""
    from megatron_tst.config import RunConfig
    from megatron_tst.training.distributed import destroy_distributed, init_distributed

    env = init_distributed(RunConfig())
    yield env
    destroy_distributed()
