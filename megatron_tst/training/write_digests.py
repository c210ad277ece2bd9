"""CRC32s of a checkpoint's data files taken while megatron writes them, not by reading them back.

A completion record (``checkpoint.json``) holds the size and CRC32 of every file of the step
directory (``saved.verify_files`` checks them at resume). Reading a checkpoint back to checksum
it costs a second pass over every byte: from the page cache while it still holds the files, or
from the parallel file system once it does not (a 10B-A1B checkpoint is ~145 GB), and on the CPU
that pass competes with training for memory bandwidth (``benchmarks/checkpoint_stall.py``).
So the data files (``*.distcp``, all but a few kilobytes of a checkpoint) are checksummed as
they are written: ``written_digests()`` makes megatron's writer
(``dist_checkpointing.strategies.filesystem_async``, synchronous and background saves alike)
open them through a file that updates a CRC32 with each chunk just before writing it, while the
chunk is in the CPU's cache.

Only what is certain is used: a file whose writer moved its position (``seek``), that was not
closed, or whose size on disk differs from the bytes that went through the file, is left out, and
a file written where the patch does not reach (another storage client, a writer megatron opens
some other way) is not in the result. The callers checksum everything left out by reading it
(``saved.digest_files``), as before; so is every file when the temporary directory below cannot
be written (a save never fails for its checksums). The patch is a module global of megatron's writer module
(the ``open`` its write functions look up), set for the duration of one write in the process
that writes (the trainer for a synchronous save, the writer process for a background one;
megatron 0.16.1 writes in processes forked from it, which inherit it) and removed after. Each
file's figures are left in a temporary directory of this node (``megatron-tst-write-digests-*``
under ``TMPDIR``, removed when the write returns; not in the step directory, which megatron
expects empty at a save).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # checksummed, then written: small enough to stay in the CPU's cache
SUFFIX = ".distcp"  # torch's data files; the metadata files are written by other code


class _DigestingFile(io.FileIO):
    """A file opened for writing that updates a CRC32 with every chunk, in file order, and at
    ``close`` leaves its size and CRC32 in ``sink`` (a directory: megatron 0.16.1 writes in
    processes it forks, which share no memory with the caller)."""

    def __init__(self, name: str, sink: Path):
        super().__init__(name, "wb")
        self.path, self.sink = os.path.abspath(name), sink
        self.crc, self.size, self.appended_only = 0, 0, True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            chunk = view[done:done + CHUNK_BYTES]
            crc = zlib.crc32(chunk, self.crc)
            n = super().write(chunk)
            if not n:
                break
            self.crc = crc if n == len(chunk) else zlib.crc32(chunk[:n], self.crc)
            done += n
            if n < len(chunk):
                break  # a short write: the buffered file above writes the rest
        self.size += done
        return done

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if not (pos == 0 and whence == io.SEEK_CUR):  # the bytes would no longer be in order
            self.appended_only = False
        return super().seek(pos, whence)

    def truncate(self, size=None) -> int:
        self.appended_only = False
        return super().truncate(size)

    def close(self) -> None:
        if not self.closed and self.appended_only:
            out = self.sink / f"{os.path.basename(self.path)}.json"
            tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps({"path": self.path, "size": self.size,
                                           "crc": self.crc}))
                os.replace(tmp, out)
            except OSError:  # (a full TMPDIR) never fails the save: the file is read back
                pass
        super().close()


@contextlib.contextmanager
def written_digests(step_dir: Path) -> Iterator[dict]:
    """While the ``with`` runs, megatron's writer (in this process and the ones it forks) opens
    the data files of a save through ``_DigestingFile``; the dict yielded is filled, after the
    ``with``, with ``{file name: {"size", "crc32"}}`` of the files of ``step_dir`` written that
    way and intact on disk (the format of ``saved.digest_files``)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    step_dir = Path(step_dir).resolve()
    result: dict = {}
    try:
        sink = Path(tempfile.mkdtemp(prefix="megatron-tst-write-digests-"))
    except OSError as err:  # never fails the save: its files are read back
        log.warning("no temporary directory for the checkpoint's checksums (%s): the files "
                    "are read back after the write; set TMPDIR to a writable directory", err)
        yield result
        return

    def open_for_megatron(file, mode="r", *args, **kwargs):
        if mode == "wb" and str(file).endswith(SUFFIX) and not args and not kwargs:
            return io.BufferedWriter(_DigestingFile(os.fspath(file), sink))
        return open(file, mode, *args, **kwargs)

    previous = vars(filesystem_async).get("open")
    filesystem_async.open = open_for_megatron
    try:
        yield result
    finally:
        if previous is None:
            del filesystem_async.open
        else:
            filesystem_async.open = previous
        found = _read_sink(sink)
        shutil.rmtree(sink, ignore_errors=True)
    for name, (size, crc) in found.items():
        path = Path(name)
        try:
            intact = path.parent.resolve() == step_dir and path.stat().st_size == size
        except OSError:
            intact = False
        if intact:
            result[path.name] = {"size": size, "crc32": f"{crc:08x}"}


def _read_sink(sink: Path) -> dict:
    """{absolute path: (size, crc)} of the digests left in ``sink``; an unreadable one is
    skipped (its file is then read back)."""
    found = {}
    for entry in sink.glob("*.json"):
        try:
            d = json.loads(entry.read_text())
            found[str(d["path"])] = (int(d["size"]), int(d["crc"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found
