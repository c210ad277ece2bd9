"""DataStream: the chunk and position arithmetic of both TST phases, against a hand count."""

from __future__ import annotations

import pytest

from megatron_tst.data.stream import DataStream
from megatron_tst.tst.schedule import RECOVERY, SUPERPOSITION, Phase, PhaseSchedule

L, B, S = 8, 2, 4  # sequence length, global batch, bag size


def stream(total=10, superposition=3, bag=S) -> DataStream:
    return DataStream.for_schedule(PhaseSchedule(total, bag, superposition), L, B, eval_steps=2)


def chunks(n: int) -> list[dict]:
    """n chunks of S*L tokens whose token i of chunk c is 1000*c + i."""
    return [{k: [1000 * c + i for i in range(S * L)] for k in ("tokens", "labels", "loss_mask")}
            for c in range(n)]


def test_sizes():
    s = stream()
    assert s.data_chunk == S and s.chunk_tokens == S * L
    # 3 superposition steps read S*L tokens per sample, 7 recovery steps L: 2*(3*4 + 7) = 38
    # sequences, in chunks of 4: 10 chunks (the last one half read).
    assert s.train_chunks == 10 and s.valid_chunks == 2 * B
    assert stream(superposition=0).data_chunk == 1 and stream(bag=1).data_chunk == 1
    assert stream(superposition=0).train_chunks == 10 * B


def test_both_phases_walk_one_order():
    s, data = stream(), chunks(10)
    sup, rec = Phase(SUPERPOSITION, S), Phase(RECOVERY, 1)
    tokens = 0
    for _ in range(3):  # superposition: whole chunks, B per step
        first = s.first_sample(tokens, sup)
        assert [s.view(data, sup)[first + i]["tokens"][0] for i in range(B)] == \
            [1000 * (tokens // (S * L) + i) for i in range(B)]
        tokens += s.step_tokens(sup)
    assert tokens == 3 * B * S * L
    view = s.view(data, rec)  # recovery: the next chunk, cut in S samples of L tokens
    first = s.first_sample(tokens, rec)
    assert [view[first + i]["tokens"][0] for i in range(S)] == [6000 + L * i for i in range(S)]
    assert len(view) == 10 * S and len(s.view(data, sup)) == 10


def test_superposition_cannot_follow_recovery_steps():
    s = stream()
    with pytest.raises(ValueError, match="not at a 4-sequence chunk boundary"):
        s.first_sample(3 * B * S * L + B * L, Phase(SUPERPOSITION, S))


def test_resume_problems():
    s = stream()
    assert s.resume_problem(step=2, phase=SUPERPOSITION, consumed_tokens=2 * B * S * L,
                            data_chunk=S) is None
    assert s.resume_problem(step=5, phase=RECOVERY, consumed_tokens=1, data_chunk=S) is None
    back = s.resume_problem(step=2, phase=RECOVERY, consumed_tokens=B * L, data_chunk=S)
    assert "a run cannot go back to superposition" in back
    moved = stream(superposition=0).resume_problem(step=4, phase="standard",
                                                   consumed_tokens=B * S * L, data_chunk=S)
    assert "read data in chunks of 4 x model.seq_length tokens, this run in chunks of 1" in moved
    assert stream(superposition=0).resume_problem(step=0, phase="", consumed_tokens=0,
                                                  data_chunk=S) is None
