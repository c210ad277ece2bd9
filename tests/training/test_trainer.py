"""End-to-end training through the CLI: resume is bitwise identical, DP=2 over gloo matches DP=1."""

import math
from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_cli


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def test_save_stop_resume_is_bitwise_identical(tiny_recipe, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run_cli(["train", str(tiny_recipe), f"run_dir={full}"])
    # Same recipe, stopped after step 3 (the schedule still runs to train_steps), then resumed.
    first = run_cli(["train", str(tiny_recipe), f"run_dir={split}", "training.exit_at_step=3"])
    assert "stopped (exit_at_step) at step 3" in first.stdout
    ckpt = split / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000003"
    assert (ckpt / "step_0000003" / "run_config.yaml").is_file()
    second = run_cli(["train", str(tiny_recipe), f"run_dir={split}"])
    assert "resumed from" in second.stdout and "finished at step 6" in second.stdout
    assert losses(split) == losses(full)  # exact float equality, every step
    assert [r["loss"] for r in read_metrics(split, "valid")][-1] == \
        [r["loss"] for r in read_metrics(full, "valid")][-1]


@pytest.mark.newest_line
def test_checkpoint_interval_retention_and_metric_sinks(tiny_recipe, tmp_path):
    run = tmp_path / "keep"
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", "checkpoint.save_interval=2",
             "checkpoint.keep_last=2", "logging.wandb=true", "logging.tensorboard=true"],
            env={"WANDB_MODE": "offline", "WANDB_API_KEY": ""})
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*"))
    train = read_metrics(run)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= train[0].keys()
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000004", "step_0000006"]
    assert (ckpt / "latest").read_text().strip() == "step_0000006"
    out = run_cli(["inspect", str(ckpt)]).stdout
    assert '"step": 6' in out and '"consumed_samples": 24' in out


def test_two_process_data_parallel_matches_one_process(tiny_recipe, tmp_path):
    """DP=2 with megatron DDP and the distributed optimizer over gloo = DP=1 on the same batches."""
    one, two = tmp_path / "dp1", tmp_path / "dp2"
    run_cli(["train", str(tiny_recipe), f"run_dir={one}", "training.train_steps=4"])
    run_cli(["train", str(tiny_recipe), f"run_dir={two}", "training.train_steps=4",
             "parallel.use_distributed_optimizer=true", "logging.log_memory=true"], nproc=2)
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):  # equal up to the order of floating-point sums
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
    assert (two / "checkpoints" / "latest").is_file()
    # megatron timers, min and max over the 2 ranks, every logged step (tests/training/test_perf.py)
    for r in b:
        for name in ("forward_backward", "optimizer", "data"):
            assert 0 < r[f"time_{name}_min_s"] <= r[f"time_{name}_max_s"]
        assert r["rss_peak_gib"] >= r["rss_gib"] > 0  # the largest over the ranks
    assert [r["step"] for r in b if "time_eval_max_s" in r] == [4]  # evaluated after step 3


def test_config_error_exits_cleanly(tiny_recipe):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "megatron_tst.cli", "train", str(tiny_recipe),
                          "optimizer.lrr=1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "did you mean 'optimizer.lr'" in res.stderr and "Traceback" not in res.stderr


def test_loss_decreases_on_bundled_corpus(tmp_path):
    """The real demo path (gensim corpus, trained sentencepiece, indexed datasets), shortened:
    superposition for 18 steps, then recovery."""
    pytest.importorskip("gensim")
    run = tmp_path / "demo"
    out = run_cli(["demo", f"run_dir={run}", "training.train_steps=60", "training.eval_interval=60",
                   "training.log_interval=10", "model.num_layers=2", "model.seq_length=64",
                   "checkpoint.save_interval=0", "logging.wandb=false", "schedule.warmup_steps=5"])
    records = read_metrics(run)
    train = [r["loss"] for r in records]
    valid = read_metrics(run, "valid")
    assert len(train) == 60 and [r["step"] for r in valid] == [18, 60]  # at the switch and the end
    assert {r["phase"] for r in records[:18]} == {"superposition"}
    assert train[0] == pytest.approx(math.log(4096), abs=0.3)  # uniform start over the vocab
    assert sum(train[-10:]) / 10 < train[0] - 1.0  # clearly falling, after the switch too
    assert valid[-1]["loss"] < train[0] - 1.0
    assert "final validation loss" in out.stdout and "checkpoint" in out.stdout
    assert (run / "data" / "train.bin").is_file()  # the prepared corpus is cached in the run dir


def test_vocab_smaller_than_the_tokenizer_is_refused(tiny_recipe):
    res = run_cli(["train", str(tiny_recipe), "model.vocab_size=50"], check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model.vocab_size=50: is smaller than the tokenizer's vocabulary (96" in res.stderr
