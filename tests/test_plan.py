"""RunPlan: what a recipe decides, derived once (schedule, stream, layout, vocabulary, model)."""

from __future__ import annotations

import pytest

from megatron_tst.config import ConfigError, load_config
from megatron_tst.plan import RunPlan, schedule_for
from megatron_tst.tst.schedule import PhaseSchedule

BASE = ["data.source=demo", "schedule.warmup_steps=1", "training.train_steps=20",
        "training.global_batch_size=16", "training.micro_batch_size=2", "model.seq_length=32"]


def cfg(*overrides):
    return load_config(None, [*BASE, *overrides])


def test_the_plan_of_a_tst_run_on_four_processes():
    c = cfg("tst.bag_size=4", "tst.ratio=0.25", "parallel.tensor_model_parallel_size=2",
            "model.make_vocab_size_divisible_by=64")
    plan = RunPlan.build(c, 4)
    assert plan.schedule == schedule_for(c) == PhaseSchedule(20, 4, 5)
    assert plan.stream.data_chunk == 4 and plan.stream.chunk_tokens == 128
    assert (plan.layout.tp, plan.layout.dp, plan.layout.num_microbatches) == (2, 2, 4)
    assert plan.vocab_size is None and plan.bag_model
    vocab = plan.with_vocab(96)
    assert (vocab.vocab_size, vocab.padded_vocab_size) == (96, 128)  # 64 x TP=2 rows per step
    assert vocab.with_vocab(96, padded=256).padded_vocab_size == 256  # a saved model's rows
    assert plan.slot_weights.tolist() == [0.25] * 4


def test_a_plain_run_keeps_megatron_s_gptmodel():
    plan = RunPlan.build(cfg(), 1)
    assert not plan.schedule.is_tst and plan.stream.data_chunk == 1
    assert plan.loss_impl == "fused" and not plan.bag_model  # CPU: auto -> fused
    assert RunPlan.build(cfg("loss.implementation=chunked")).bag_model


def test_vocabulary_and_layout_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        RunPlan.build(cfg("model.vocab_size=64")).with_vocab(96, "tok.model")
    assert err.value.key == "model.vocab_size" and "96 entries, tok.model" in str(err.value)
    assert RunPlan.build(cfg("model.vocab_size=200")).with_vocab(96).vocab_size == 200
    with pytest.raises(ConfigError, match="training.global_batch_size"):
        RunPlan.build(cfg(), 3)
