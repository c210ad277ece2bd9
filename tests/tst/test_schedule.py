"""Phase schedule: the switch step, bag sizes, data-token accounting."""

from megatron_tst.config import load_config
from megatron_tst.plan import schedule_for
from megatron_tst.tst.schedule import RECOVERY, STANDARD, SUPERPOSITION


def schedule(*overrides):
    return schedule_for(load_config(None, ["data.source=demo", "schedule.warmup_steps=1", *overrides]))


def test_switch_at_round_r_times_t():
    s = schedule("training.train_steps=100", "tst.bag_size=6", "tst.ratio=0.3")
    assert s.superposition_steps == 30 and s.is_tst and s.data_chunk == 6
    assert s.phase(0).name == s.phase(29).name == SUPERPOSITION and s.phase(29).bag_size == 6
    assert s.phase(30).name == RECOVERY and s.phase(30).bag_size == 1
    assert s.segment_end(0) == 30 and s.segment_end(30) == 100
    assert schedule("training.train_steps=7", "tst.bag_size=4", "tst.ratio=0.25").superposition_steps == 2


def test_standard_training_cases():
    for extra in (["tst.bag_size=1"], ["tst.bag_size=4", "tst.ratio=0"],
                  ["tst.bag_size=4", "tst.superposition_steps=0"]):
        s = schedule("training.train_steps=10", *extra)
        assert not s.is_tst and s.data_chunk == 1
        assert {s.phase(i).name for i in range(10)} == {STANDARD}


def test_data_tokens_equal_flops_accounting():
    s = schedule("training.train_steps=10", "tst.bag_size=4", "tst.superposition_steps=3",
                 "training.global_batch_size=8", "model.seq_length=16")
    assert s.data_tokens(3, 8, 16) == 3 * 4 * 8 * 16  # s times more text per superposition step
    assert s.data_tokens(10, 8, 16) == (3 * 4 + 7) * 8 * 16
