"""How long the integrity check of a checkpoint takes: CRC32 throughput of ``training/saved.py``.

Every save records each file's size and CRC32 in ``checkpoint.json``; every resume, ``eval``,
``export`` and ``inspect`` verifies them (``saved.digest_files`` / ``saved.verify_files``: the
trainer gives each rank its share of the files, each rank reads with ``CHECKSUM_THREADS``
threads). This writes ``--gib`` GiB of random data in ``--files`` files (as a checkpoint's shards)
and times a full digest and a full verification, with 1 thread and with the default, then
extrapolates to a 10B-A1B checkpoint (~145 GB) over a number of ranks.

    python benchmarks/checkpoint_checksum.py --gib 2 --files 8

The files are read from the page cache after being written (the machine's memory permitting):
the figures are the CPU cost of CRC32, an upper bound of the speed; a cold read is limited by
the file system, which the checksum then keeps up with.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from megatron_tst.training import saved

CHECKPOINT_10B_A1B = 145e9  # bytes of model and optimizer state (docs/benchmarks.md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="GiB of shard data to checksum")
    p.add_argument("--files", type=int, default=8, help="number of shard files")
    p.add_argument("--ranks", type=int, nargs="*", default=[8, 64],
                   help="rank counts to extrapolate the 10B-A1B verification to")
    args = p.parse_args()
    size = int(args.gib * 2**30 / args.files)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.files):
            with open(root / f"__{i}_0.distcp", "wb") as f:
                for _ in range(0, size, 64 << 20):
                    f.write(os.urandom(min(64 << 20, size)))
        total = sum(f.stat().st_size for f in root.iterdir())
        rows = []
        default_threads = saved.CHECKSUM_THREADS
        for threads in (1, default_threads):
            saved.CHECKSUM_THREADS = threads
            tic = time.perf_counter()
            digests = saved.digest_files(root)
            digest_s = time.perf_counter() - tic
            tic = time.perf_counter()
            problems = saved.verify_files(root, digests)
            verify_s = time.perf_counter() - tic
            assert not problems
            rows.append((threads, digest_s, verify_s))
        saved.CHECKSUM_THREADS = default_threads
    print(f"{total / 2**30:.2f} GiB in {args.files} files, {os.cpu_count()} CPUs")
    for threads, digest_s, verify_s in rows:
        print(f"  {threads} thread(s): digest {digest_s:.2f} s ({total / 2**30 / digest_s:.2f} GiB/s)"
              f", verify {verify_s:.2f} s ({total / 2**30 / verify_s:.2f} GiB/s)")
    best = total / min(r[2] for r in rows)
    for ranks in args.ranks:
        print(f"  10B-A1B checkpoint ({CHECKPOINT_10B_A1B / 1e9:.0f} GB) over {ranks} ranks at this "
              f"speed per rank: {CHECKPOINT_10B_A1B / ranks / best:.1f} s")


if __name__ == "__main__":
    main()
