"""CRC32s taken while megatron writes a checkpoint equal the files' CRC32s read back (zlib over the
bytes on disk, ``saved.digest_files``), and only what is certain is used."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import tempfile
import zlib

import pytest
import torch

from megatron_tst.training import checkpoint as ckpt
from megatron_tst.training import saved, write_digests
from megatron_tst.training.saved import digest_files
from megatron_tst.training.write_digests import CHUNK_BYTES, written_digests


def crc_of(path) -> str:
    return f"{zlib.crc32(path.read_bytes()):08x}"


def writer_module():
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    return filesystem_async


def sharded_state() -> dict:
    """Tensors of several sizes, one spanning several of the digest's chunks."""
    from megatron.core.dist_checkpointing import ShardedTensor

    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(3 * CHUNK_BYTES // 4 + 123, generator=g),
               "matrix": torch.randn(64, 48, generator=g),
               "ints": torch.arange(1000, dtype=torch.int64)}
    return {k: ShardedTensor.from_rank_offsets(k, t, replica_id=0) for k, t in tensors.items()}


def test_a_megatron_save_is_digested_as_written(tmp_path, megatron_env, monkeypatch, caplog):
    from megatron.core import dist_checkpointing

    step, scratch = tmp_path / "step", tmp_path / "tmp"
    step.mkdir(), scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the writers leave digests
    with written_digests(step) as written:
        dist_checkpointing.save(sharded_state(), str(step))
    assert "open" not in vars(writer_module())  # the patch is gone, and the digests' directory
    assert not list(scratch.iterdir())
    assert "Overwriting" not in caplog.text  # megatron found the step directory empty
    data = sorted(p.name for p in step.glob("*.distcp"))
    assert data and sorted(written) == data
    assert written == digest_files(step, names=data)  # the files read back
    assert all(written[n]["crc32"] == crc_of(step / n) for n in data)
    loaded = dist_checkpointing.load(sharded_state(), str(step))  # still a checkpoint
    assert torch.equal(loaded["big"], sharded_state()["big"].data)


def test_a_synchronous_save_reads_back_only_what_was_not_digested(tmp_path, megatron_env,
                                                                   monkeypatch):
    from megatron.core import dist_checkpointing

    with written_digests(tmp_path) as written:
        dist_checkpointing.save(sharded_state(), str(tmp_path))
    read = []
    crc32 = saved._crc32
    monkeypatch.setattr(saved, "_crc32", lambda path: read.append(path.name) or crc32(path))
    files = ckpt._gather_digests(tmp_path, written)
    assert read and not any(name.endswith(".distcp") for name in read)
    assert files == digest_files(tmp_path)  # every file, as a full read-back gives them


def digest_one(tmp_path, body, name="__0_0.distcp") -> dict:
    """``body(f)`` writes through the patched ``open``, as megatron's writer does."""
    with written_digests(tmp_path) as written:
        with writer_module().open(tmp_path / name, "wb") as f:
            body(f)
    return written


def test_torch_save_through_the_digesting_file(tmp_path):
    tensor = torch.randn(CHUNK_BYTES // 2 + 7)  # over one chunk with torch's framing

    def body(f):
        f.write(b"header")
        f.tell()  # a position query (torch's writer asks) keeps the digest
        torch.save(tensor, f)
        f.write(memoryview(torch.arange(10, dtype=torch.int32).numpy()))  # not a byte format
    written = digest_one(tmp_path, body)
    path = tmp_path / "__0_0.distcp"
    assert written == {path.name: {"size": path.stat().st_size, "crc32": crc_of(path)}}


@pytest.mark.parametrize("case", ["seek", "truncate", "changed_after", "outside", "not_data"])
def test_what_is_not_certain_is_left_out(tmp_path, case):
    name = "model.pt" if case == "not_data" else "__0_0.distcp"

    def body(f):
        f.write(b"x" * 100)
        if case == "seek":
            f.seek(10)
            f.write(b"y")
        elif case == "truncate":
            f.truncate(50)
    target = tmp_path / ("elsewhere" if case == "outside" else ".")
    target.mkdir(exist_ok=True)
    with written_digests(tmp_path / "." if case != "outside" else tmp_path) as written:
        with writer_module().open(target / name, "wb") as f:
            body(f)
        if case == "changed_after":
            with open(target / name, "ab") as f:
                f.write(b"z")
    assert written == {}
    expected = {"seek": b"x" * 10 + b"y" + b"x" * 89, "truncate": b"x" * 50,
                "changed_after": b"x" * 100 + b"z"}.get(case, b"x" * 100)
    assert (target / name).read_bytes() == expected  # written as asked all the same


def test_other_opens_pass_through_and_the_patch_goes_on_error(tmp_path):
    (tmp_path / "a.distcp").write_bytes(b"abc")
    with pytest.raises(RuntimeError, match="boom"):
        with written_digests(tmp_path):
            with writer_module().open(tmp_path / "a.distcp", "rb") as f:  # a read: builtin open
                assert isinstance(f, io.BufferedReader) and f.read() == b"abc"
            raise RuntimeError("boom")
    assert "open" not in vars(writer_module())


def test_an_unwritable_temporary_directory_never_fails_a_save(tmp_path, megatron_env, monkeypatch):
    """The checksums then come from reading the files back."""
    from megatron.core import dist_checkpointing

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with written_digests(tmp_path) as written:
        dist_checkpointing.save(sharded_state(), str(tmp_path))
    assert written == {} and "open" not in vars(writer_module())
    assert ckpt._gather_digests(tmp_path, written) == digest_files(tmp_path)


def test_a_full_temporary_directory_never_fails_a_write(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def body(f):
        f.write(b"x" * 100)
        monkeypatch.setattr(os, "replace", refuse)  # the digest cannot be left
    assert digest_one(tmp_path, body) == {}
    assert (tmp_path / "__0_0.distcp").read_bytes() == b"x" * 100


def direct_opens(monkeypatch) -> list:
    """The flags of every ``os.open`` of the digesting file, recorded."""
    flags, real = [], os.open
    monkeypatch.setattr(os, "open", lambda path, f, *a: flags.append(f) or real(path, f, *a))
    return flags


def tensor_body(tensor):
    return lambda f: (f.write(b"head"), torch.save(tensor, f))


def takes_direct(directory) -> bool:
    """Whether the file system of ``directory`` opens files with O_DIRECT (tmpfs before Linux
    6.6 does not)."""
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | write_digests.DIRECT))
        return True
    except OSError:
        return False
    finally:
        (directory / "probe").unlink(missing_ok=True)


@pytest.mark.skipif(not write_digests.DIRECT, reason="O_DIRECT is Linux's")
def test_data_files_are_written_around_the_page_cache(tmp_path, monkeypatch):
    """O_DIRECT asked for (taken where the file system takes it), and the bytes and digest are
    those of a plain write, an unaligned tail included."""
    flags = direct_opens(monkeypatch)
    tensor = torch.randn(CHUNK_BYTES // 4 + 1001)
    written = digest_one(tmp_path, tensor_body(tensor))
    path = tmp_path / "__0_0.distcp"
    # the first open asks for O_DIRECT; a second, without it, only where the file system refuses
    assert flags and flags[0] & write_digests.DIRECT
    assert len(flags) == 1 or not takes_direct(tmp_path)
    assert path.stat().st_size % write_digests.ALIGN  # a tail written after the aligned part
    assert written == {path.name: {"size": path.stat().st_size, "crc32": crc_of(path)}}
    with open(path, "rb") as f:
        assert f.read(4) == b"head" and torch.equal(torch.load(f), tensor)


@pytest.mark.skipif(not write_digests.DIRECT, reason="O_DIRECT is Linux's")
@pytest.mark.parametrize("refused", ["open", "write"])
def test_a_file_system_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch,
                                                                      refused):
    """Some file systems refuse O_DIRECT at the open (tmpfs before Linux 6.6), some at the first
    write: the file is then written through the page cache."""
    if refused == "write" and not takes_direct(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT at the open")
    real_open, real_write, refusals = os.open, os.write, []

    def open_(path, flags, *a):
        if refused == "open" and flags & write_digests.DIRECT:
            refusals.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def write(fd, data):
        if refused == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & write_digests.DIRECT:
            refusals.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "write", write)
    tensor = torch.randn(3 * CHUNK_BYTES // 8)
    with written_digests(tmp_path) as written:
        with writer_module().open(tmp_path / "__0_0.distcp", "wb") as f:
            tensor_body(tensor)(f)
            assert not f.direct
    path = tmp_path / "__0_0.distcp"
    assert refusals
    assert written == {path.name: {"size": path.stat().st_size, "crc32": crc_of(path)}}
    with open(path, "rb") as f:
        assert f.read(4) == b"head" and torch.equal(torch.load(f), tensor)


def test_direct_writes_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(write_digests.ENV, "0")
    flags = direct_opens(monkeypatch)
    written = digest_one(tmp_path, tensor_body(torch.randn(1000)))
    assert flags and not any(f & write_digests.DIRECT for f in flags) and written


def test_a_failed_write_fails_the_save(tmp_path, monkeypatch):
    """A write error other than a refused O_DIRECT (here a full disk) reaches megatron's writer,
    which reports the save failed."""
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        digest_one(tmp_path, tensor_body(torch.randn(CHUNK_BYTES // 2)))
    assert "open" not in vars(writer_module())
