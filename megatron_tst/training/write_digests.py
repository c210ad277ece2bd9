"""How megatron's writer writes a checkpoint's data files: checksummed as they are written (no
read-back), and around the page cache (``O_DIRECT``).

A completion record (``checkpoint.json``) holds the size and CRC32 of every file of the step
directory (``saved.verify_files`` checks them at resume). Reading a checkpoint back to checksum
it costs a second pass over every byte: from the page cache while it still holds the files, or
from the parallel file system once it does not (a 10B-A1B checkpoint is ~145 GB), and on the CPU
that pass competes with training for memory bandwidth (``benchmarks/checkpoint_stall.py``).
So the data files (``*.distcp``, all but a few kilobytes of a checkpoint) are checksummed as
they are written: ``written_digests()`` makes megatron's writer
(``dist_checkpointing.strategies.filesystem_async``, synchronous and background saves alike)
open them through a file that gathers the bytes in a page-aligned buffer and updates a CRC32
with each full buffer just before writing it, while it is in the CPU's cache. The buffer is
written with ``O_DIRECT`` where the file system takes it: megatron syncs every file anyway, and
going through the page cache only adds a copy of every byte, the kernel's writeback of it later
and gigabytes of checkpoint in the page cache (``benchmarks/checkpoint_stall.py``, with and
without ``MEGATRON_TST_DIRECT_IO=0``, measures what it saves).

Only what is certain is used: a file whose writer moved its position (``seek``), that was not
closed, or whose size on disk differs from the bytes that went through the file, is left out, and
a file written where the patch does not reach (another storage client, a writer megatron opens
some other way) is not in the result. The callers checksum everything left out by reading it
(``saved.digest_files``), as before; so is every file when the temporary directory below cannot
be written (a save never fails for its checksums). The patch is a module global of megatron's
writer module (the ``open`` its write functions look up), set for the duration of one write in
the process that writes (the trainer for a synchronous save, the writer process for a background
one; megatron 0.16.1 writes in processes forked from it, which inherit it) and removed after.
Each file's figures are left in a temporary directory of this node (``megatron-tst-write-digests-*``
under ``TMPDIR``, removed when the write returns; not in the step directory, which megatron
expects empty at a save).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import mmap
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # checksummed, then written: small enough to stay in the CPU's cache
ALIGN = 4096  # O_DIRECT: offsets and lengths in whole blocks (4 KiB covers 512 B and 4 KiB ones)
DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every file goes through the page cache
ENV = "MEGATRON_TST_DIRECT_IO"  # "0": every data file written through the page cache
SUFFIX = ".distcp"  # torch's data files; the metadata files are written by other code


class _DigestingFile(io.FileIO):
    """A data file opened for writing, its bytes gathered in a page-aligned buffer of
    ``CHUNK_BYTES``; each full buffer is CRC32'd (in file order) and written in one call, with
    ``O_DIRECT`` where the file system takes it. At ``close`` the rest is written and synced, and
    the file's size and CRC32 are left in ``sink`` (a directory: megatron 0.16.1 writes in
    processes it forks, which share no memory with the caller; None: no digest is left).

    ``O_DIRECT`` moves the bytes from the buffer to the device without a copy into the page
    cache and the kernel's later writeback of it: less memory traffic beside a training that
    is running, and no gigabytes of checkpoint crowding the page cache. A file system that
    refuses it (at the open, as tmpfs before Linux 6.6, or at a write, with EINVAL) is written
    through the page cache instead, from that point on; so is every file with
    ``MEGATRON_TST_DIRECT_IO=0`` (in the job's environment: the writer processes inherit it)."""

    def __init__(self, name: str, sink: Optional[Path]):
        self.buffer = mmap.mmap(-1, CHUNK_BYTES)  # page-aligned, as O_DIRECT needs
        self.view, self.filled, self.direct = memoryview(self.buffer), 0, False
        self.through = False  # after a seek or a truncate: bytes out of order, no digest
        self.path, self.sink = os.path.abspath(name), sink
        self.crc, self.size = 0, 0
        super().__init__(name, "wb", opener=self._open)

    def _open(self, path: str, flags: int) -> int:
        if DIRECT and os.environ.get(ENV, "1") != "0":
            try:
                fd = os.open(path, flags | DIRECT, 0o666)
                self.direct = True
                return fd
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
        return os.open(path, flags, 0o666)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.through:  # after a seek or a truncate: written as it comes
            self._write_all(view)
            return len(view)
        done = 0
        while done < len(view):
            take = min(len(view) - done, CHUNK_BYTES - self.filled)
            self.view[self.filled:self.filled + take] = view[done:done + take]
            self.filled += take
            done += take
            if self.filled == CHUNK_BYTES:
                self._drain()
        self.size += done
        return done

    def _drain(self, last: bool = False) -> None:
        """Checksum and write the buffer; all of it, or (``last``) its aligned part directly
        and the rest through the page cache."""
        with self.view[:self.filled] as data:
            self.crc = zlib.crc32(data, self.crc)
            whole = self.filled - self.filled % ALIGN if last else self.filled
            self._write_all(data[:whole])
            if whole < self.filled:
                self._without_direct()
                self._write_all(data[whole:])
        self.filled = 0

    def _write_all(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.write(self.fileno(), data[done:])
            except OSError as err:
                if not (self.direct and err.errno == errno.EINVAL):
                    raise
                self._without_direct()  # refused (or a short write left the offset unaligned)

    def _without_direct(self) -> None:
        if self.direct:
            fcntl.fcntl(self.fileno(), fcntl.F_SETFL,
                        fcntl.fcntl(self.fileno(), fcntl.F_GETFL) & ~DIRECT)
            self.direct = False

    def _write_through(self) -> None:
        """From a seek or a truncate on: the buffer written out, and no digest."""
        if not self.through:
            self._drain(last=True)
            self._without_direct()  # writes of any size at any offset from now on
            self.through = True

    def tell(self) -> int:
        return super().tell() if self.through else self.size

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if pos == 0 and whence == io.SEEK_CUR:  # a position query (torch's writer asks)
            return self.tell()
        self._write_through()
        return super().seek(pos, whence)

    def truncate(self, size=None) -> int:
        self._write_through()
        return super().truncate(size)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.filled:
                self._drain(last=True)
                os.fsync(self.fileno())  # megatron synced the file before this last write
            if not self.through and self.sink is not None:
                self._leave_digest()
        finally:
            self.view.release()
            with contextlib.suppress(BufferError):  # a view still held by a failed write's
                self.buffer.close()  # traceback: the buffer is freed with it
            super().close()

    def _leave_digest(self) -> None:
        out = self.sink / f"{os.path.basename(self.path)}.json"
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"path": self.path, "size": self.size, "crc": self.crc}))
            os.replace(tmp, out)
        except OSError:  # (a full TMPDIR) never fails the save: the file is read back
            pass


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
        sink: Optional[Path] = Path(tempfile.mkdtemp(prefix="megatron-tst-write-digests-"))
    except OSError as err:  # never fails the save: its files are read back
        log.warning("no temporary directory for the checkpoint's checksums (%s): the files "
                    "are read back after the write; set TMPDIR to a writable directory", err)
        sink = None

    def open_for_megatron(file, mode="r", *args, **kwargs):
        if mode == "wb" and str(file).endswith(SUFFIX) and not args and not kwargs:
            return _DigestingFile(os.fspath(file), sink)
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
        found = {}
        if sink:
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
