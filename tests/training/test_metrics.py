"""The run directory's wandb id survives resumes, and a damaged id file is replaced."""

from __future__ import annotations

from megatron_tst.training.metrics import _wandb_id


def test_wandb_id_is_stable_and_a_damaged_one_is_replaced(tmp_path):
    first = _wandb_id(tmp_path)
    assert len(first) == 12 and _wandb_id(tmp_path) == first
    for damage in (b"\xff\x00garbage", b"", b"../../x"):
        (tmp_path / "wandb_id.txt").write_bytes(damage)
        fresh = _wandb_id(tmp_path)
        assert len(fresh) == 12 and (tmp_path / "wandb_id.txt").read_text() == fresh
