"""The checkpoint reader's integrity check, on real files: sizes and CRC32s against zlib."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

from megatron_tst.training import saved

ROOT = Path(__file__).resolve().parents[2]


def test_digest_and_verify_find_every_kind_of_damage(tmp_path):
    files = {"__0_0.distcp": b"a" * 100_000, "__1_0.distcp": bytes(range(256)) * 300,
             "common.pt": b"common", saved.RECORD: b"{}", "run_config.yaml": b"x: 1"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    digests = saved.digest_files(tmp_path)
    assert sorted(digests) == ["__0_0.distcp", "__1_0.distcp", "common.pt"]  # not the records
    assert digests["common.pt"] == {"size": 6, "crc32": f"{zlib.crc32(b'common'):08x}"}
    halves = [saved.digest_files(tmp_path, (r, 2)) for r in (0, 1)]
    assert {**halves[0], **halves[1]} == digests and not set(halves[0]) & set(halves[1])
    assert saved.verify_files(tmp_path, digests) == []
    data = bytearray(files["__0_0.distcp"])
    data[50_000] ^= 1  # one bit
    (tmp_path / "__0_0.distcp").write_bytes(bytes(data))
    (tmp_path / "__1_0.distcp").write_bytes(files["__1_0.distcp"][:-1])
    (tmp_path / "common.pt").unlink()
    assert saved.verify_files(tmp_path, digests) == [
        "__0_0.distcp has changed since it was written (CRC32 differs)",
        "__1_0.distcp has 76799 bytes, 76800 were written",
        "common.pt cannot be read (No such file or directory)"]
    assert saved.record_files({"files": digests}) == digests
    assert saved.record_files({"files": "garbage"}) == saved.record_files({}) == {}


def test_checksum_benchmark_runs():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_checksum.py"),
                          "--gib", "0.02", "--files", "2", "--ranks", "64"],
                         capture_output=True, text=True, timeout=600, check=True)
    assert "GiB/s" in res.stdout and "over 64 ranks" in res.stdout


def test_damaged_records_and_shards_are_checkpoint_errors(tmp_path):
    """A record that is not a JSON object is damage (auto-resume skips it); a missing shard
    (on 0.19, where the common state lives in the shards, torch raises a BaseException) is one
    CheckpointError, never a traceback."""
    import shutil

    import pytest

    from megatron_tst import mcore

    src = ROOT / "tests" / "fixtures" / "checkpoints" / f"mcore-{mcore.installed()}"
    step = tmp_path / "step_0000004"
    shutil.copytree(src / "step_0000004", step)
    good = (step / saved.RECORD).read_bytes()
    for damage in (b"\xff\xfe", good[:20], b"[1]"):
        (step / saved.RECORD).write_bytes(damage)
        with pytest.raises(saved.DamagedCheckpointError, match="checkpoint.json is damaged"):
            saved.open_checkpoint(step)
    (step / saved.RECORD).write_bytes(good)
    for shard in step.glob("*.distcp"):
        shard.unlink()
    if mcore.installed() >= mcore.COMMON_STATE_IN_SHARDS:
        with pytest.raises(saved.DamagedCheckpointError, match="cannot read the common state"):
            saved.open_checkpoint(step)
    else:  # 0.16.1 keeps the common state in common.pt: the shards are read by the load
        assert saved.open_checkpoint(step).step == 4
