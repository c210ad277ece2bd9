"""TST inside the real loop: the switch within one run, bitwise resume before/at/after it,
a phase-1 checkpoint continued as phase 2, and the honest accounting in the metrics."""

import shutil

import pytest

from tests.conftest import read_metrics, run_cli

TST = ["tst.bag_size=4", "tst.superposition_steps=3", "training.train_steps=6"]


def records(run_dir, kind="train"):
    return read_metrics(run_dir, kind)


def test_switch_inside_one_run_and_accounting(tiny_recipe, tmp_path):
    run = tmp_path / "tst"
    out = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST, "training.eval_interval=2"])
    train = records(run)
    assert [r["phase"] for r in train] == ["superposition"] * 3 + ["recovery"] * 3
    assert [r["bag_size"] for r in train] == [4] * 3 + [1] * 3
    B, L = 4, 32
    # data tokens: s times more per superposition step; model positions: equal per step
    assert [r["data_tokens"] for r in train] == [4 * B * L * k for k in (1, 2, 3)] + \
        [12 * B * L + B * L * k for k in (1, 2, 3)]
    assert [r["model_positions"] for r in train] == [B * L * k for k in range(1, 7)]
    flops = [r["flops"] for r in train]
    assert all(b - a == flops[0] for a, b in zip(flops, flops[1:]))  # equal FLOPs per step
    valid = records(run, "valid")
    assert [r["step"] for r in valid] == [2, 3, 4, 6]  # every interval and right at the switch
    assert "mce" in valid[0] and "mce" in valid[1] and "mce" not in valid[2]
    events = [r["message"] for r in records(run, "event")]
    assert any("phase switch: superposition (s=4) -> recovery after step 3" in e for e in events)
    assert "phase switch" in out.stdout


@pytest.mark.parametrize("nproc, layout", [
    pytest.param(1, [], id="1-process"),
    # slow: 5 two-process runs (test_signals.py resumes a 2-process run bitwise by default)
    pytest.param(2, ["parallel.use_distributed_optimizer=true"], id="dp2-distopt",
                 marks=pytest.mark.slow)])
def test_resume_before_at_and_after_the_switch_is_bitwise(tiny_recipe, tmp_path, nproc, layout):
    full, chain = tmp_path / "full", tmp_path / "chain"
    run_cli(["train", str(tiny_recipe), f"run_dir={full}", *TST, *layout], nproc=nproc)
    for stop in (2, 3, 4):  # before, at and after the switch (superposition_steps=3)
        run_cli(["train", str(tiny_recipe), f"run_dir={chain}", *TST, *layout,
                 f"training.exit_at_step={stop}"], nproc=nproc)
    run_cli(["train", str(tiny_recipe), f"run_dir={chain}", *TST, *layout], nproc=nproc)
    a = [(r["step"], r["phase"], r["loss"], r["grad_norm"]) for r in records(full)]
    b = [(r["step"], r["phase"], r["loss"], r["grad_norm"]) for r in records(chain)]
    assert a == b  # exact equality, every step, across three resumes
    assert records(full, "valid")[-1]["loss"] == records(chain, "valid")[-1]["loss"]
    switches = [r for r in records(chain, "event") if "phase switch" in r["message"]]
    assert len(switches) == 1  # the switch happened once, in the job resumed at step 3


def test_phase_one_checkpoint_continued_as_phase_two(tiny_recipe, tmp_path):
    first, second = tmp_path / "p1", tmp_path / "p2"
    run_cli(["train", str(tiny_recipe), f"run_dir={first}", *TST, "training.exit_at_step=2"])
    shutil.copytree(first / "checkpoints", second / "checkpoints")
    # End the superposition phase at the checkpoint's step: recovery starts right away (a
    # change of the phase boundary, accepted explicitly).
    run_cli(["train", str(tiny_recipe), f"run_dir={second}", "tst.bag_size=4",
             "tst.superposition_steps=2", "training.train_steps=6",
             "checkpoint.allow_changes=[tst.superposition_steps]"])
    train = records(second)
    assert [r["step"] for r in train] == [3, 4, 5, 6]
    assert {r["phase"] for r in train} == {"recovery"}
    # the data stream continues after the 2 superposition steps' 2*B*s*L tokens, no repeat
    assert train[0]["data_tokens"] == 2 * 4 * 4 * 32 + 4 * 32


def test_changing_bag_size_on_resume_is_refused(tiny_recipe, tmp_path):
    run = tmp_path / "p1"
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST, "training.exit_at_step=2"])
    with pytest.raises(AssertionError, match="tst.bag_size: 4 -> 2 cannot change on resume"):
        run_cli(["train", str(tiny_recipe), f"run_dir={run}", "tst.bag_size=2",
                 "tst.superposition_steps=3", "training.train_steps=6"])


@pytest.mark.slow  # CI time: test_parallel_layouts.py's tp2 layout checks the same by default
def test_tensor_parallel_tst_matches_one_process(tiny_recipe, tmp_path):
    """TP=2 over gloo (vocab-parallel superposed embedding and MCE, across the switch) = TP=1."""
    one, two = tmp_path / "tp1", tmp_path / "tp2"
    # divisible_by 64: the padded vocabulary is 128 at TP=1 and TP=2 alike
    args = [*TST, "training.train_steps=5", "model.make_vocab_size_divisible_by=64"]
    run_cli(["train", str(tiny_recipe), f"run_dir={one}", *args])
    run_cli(["train", str(tiny_recipe), f"run_dir={two}", *args,
             "parallel.tensor_model_parallel_size=2"], nproc=2)
    a, b = records(one), records(two)
    assert [r["phase"] for r in b] == ["superposition"] * 3 + ["recovery"] * 2
    for x, y in zip(a, b):  # same init (CPU initialisation), same data; sums in another order
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)  # measured: ~1e-7
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def test_switch_ablations_run(tiny_recipe, tmp_path):
    """The paper's two ablations: fresh optimizer state and re-initialised embeddings at the switch."""
    run = tmp_path / "ablate"
    out = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST, "training.eval_interval=0",
                   "tst.reset_optimizer_at_switch=true", "tst.reinit_embeddings_at_switch=true"])
    assert "switch: re-initialised the input embedding and LM head" in out.stdout
    assert "switch: reset the optimizer state" in out.stdout
    assert [r["phase"] for r in records(run)] == ["superposition"] * 3 + ["recovery"] * 3
