"""Throughput and memory of ``megatron-tst preprocess --output-dir`` against its ceiling.

The ceiling is the tokenizer's own batch encoding (``tokenizers``' ``encode_batch_fast``, one
thread, in the batches preprocessing makes; measured in the same process just before and just
after each run)
of the same documents already in memory: what preprocessing would reach if reading,
decompressing, parsing, hashing for the held-out split and writing the shards cost nothing.
Throughput is measured for 1 and 2 workers on ``.jsonl.zst`` and parquet inputs (32 files each):
tokens per wall second, and tokens per CPU second of all its processes against the ceiling's
tokens per CPU second (target: at least 0.85; CPU time, because this machine's wall-clock speed
drifts by up to 20% within a minute, which CPU time mostly does not see). Peak memory (the preprocess process and
its workers, resident set) is measured for a 10 MB and a 100 MB input, one source each: it must
not grow with the input.

    python benchmarks/preprocess_throughput.py            # 20 MB, about 6 minutes on 2 cores

Text: the demo corpus (real English: Wikipedia pages and news, from the installed gensim
package), repeated to the sizes needed; tokenizer: a byte-level BPE of 32,000 entries trained on
it with ``tokenizers``. Every process tokenizes on one thread (``RAYON_NUM_THREADS=1``), as each
worker of a real run does when ``--workers`` equals the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus_texts(megabytes: float) -> list[str]:
    from megatron_tst.data.corpus import demo_documents

    base = [d.text for d in demo_documents()]
    texts, size, copy = [], 0, 0
    while size < megabytes * 1e6:
        for text in base:
            texts.append(text if copy == 0 else f"{copy} {text}")
            size += len(text.encode())
            if size >= megabytes * 1e6:
                break
        copy += 1
    return texts


def write_inputs(root: Path, texts: list[str], fmt: str, shards: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    directory = root / fmt
    directory.mkdir(parents=True)
    per = -(-len(texts) // shards)
    for k in range(shards):
        part = texts[k * per:(k + 1) * per]
        if fmt == "jsonl.zst":
            lines = "".join(json.dumps({"text": t}) + "\n" for t in part).encode()
            (directory / f"part-{k:03d}.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor(level=3).compress(lines))
        else:
            pq.write_table(pa.table({"text": part}), directory / f"part-{k:03d}.parquet",
                           row_group_size=1000)
    return directory


def train_tokenizer(path: Path, texts: list[str], vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path))
    return path


def ceiling(tokenizer_path: Path, texts: list[str]) -> float:
    """Tokens per second of the tokenizer's own batch encoding of in-memory texts, one thread,
    in the batches preprocessing makes (``sharded._batches``), per CPU second."""
    from tokenizers import Tokenizer

    from megatron_tst.data.sharded import _batches

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encode(texts[:64])  # warm up
    tic = time.process_time()
    tokens = sum(len(e.ids) + 1 for batch in _batches(iter(texts))
                 for e in encode(batch, add_special_tokens=False))
    return tokens / (time.process_time() - tic)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def child(inputs: Path, out: Path, tokenizer_path: Path, workers: int, compare: bool) -> None:
    """One ``preprocess --output-dir`` in this fresh process; prints JSON: tokens/s after
    start-up, the ceiling measured just before and just after it (``compare``), peak memory."""
    samples: list[tuple[float, float]] = []

    def sample() -> None:
        while True:
            with open("/proc/self/statm") as f:
                samples.append((time.perf_counter(), int(f.read().split()[1]) * 4096 / 2**20))
            time.sleep(0.25)

    threading.Thread(target=sample, daemon=True).start()
    from megatron_tst.data.sharded import preprocess_sharded
    from megatron_tst.data.sources import expand_inputs, read_documents
    from megatron_tst.data.tokenizer import load_tokenizer

    texts = ([t for s in expand_inputs([inputs]).sources for t in read_documents(s)]
             if compare else [])
    before = ceiling(tokenizer_path, texts) if compare else None
    tokenizer = load_tokenizer("huggingface", tokenizer_path)
    tic, cpu = time.perf_counter(), cpu_seconds()
    result = preprocess_sharded([inputs], out, tokenizer, workers=workers, valid_fraction=0.001,
                                progress=False, log=lambda m: None)
    seconds, cpu = time.perf_counter() - tic, cpu_seconds() - cpu
    after = ceiling(tokenizer_path, texts) if compare else None
    # VmHWM: this process's peak resident memory since exec (ru_maxrss would count the parent's
    # pages at fork); the workers' own peaks
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    during = [m for t, m in samples if tic <= t <= tic + seconds]
    print(json.dumps({"tokens": result.tokens, "seconds": seconds, "cpu": cpu,
                      "ceiling": [before, after],
                      "peak_mib": peak,
                      "series": [round(m) for m in during[::max(1, len(during) // 10)]]}))


def run(inputs: Path, out: Path, tokenizer_path: Path, workers: int, compare: bool) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(inputs), str(out), str(tokenizer_path),
         str(workers), str(int(compare))],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        inputs, out, tokenizer, workers, compare = sys.argv[2:]
        return child(Path(inputs), Path(out), Path(tokenizer), int(workers), compare == "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--megabytes", type=float, default=20.0,
                   help="text for the throughput runs (default 20 MB)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--shards", type=int, default=32,
                   help="input files of the throughput runs (a real corpus has thousands)")
    p.add_argument("--skip", choices=["throughput", "memory"], action="append", default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = corpus_texts(args.megabytes)
        tokenizer = train_tokenizer(root / "tokenizer.json", texts[:400], args.vocab_size)
        print(f"{sum(len(t.encode()) for t in texts) / 1e6:.1f} MB of text, {len(texts):,} "
              f"documents, {os.cpu_count()} CPUs; ceiling: encode_batch_fast of the same texts in "
              f"memory, 1 thread, measured in the same process just before and just after")
        for fmt in () if "throughput" in args.skip else ("jsonl.zst", "parquet"):
            inputs = write_inputs(root / "in", texts, fmt, shards=args.shards)
            for workers in (1, 2):
                r = run(inputs, root / f"out-{fmt}-{workers}", tokenizer, workers, True)
                rate, top = r["tokens"] / r["seconds"], sum(r["ceiling"]) / 2
                per_cpu = r["tokens"] / r["cpu"]
                print(f"  {fmt:9s} {workers} worker(s): {rate / 1e6:.3f} M tokens/s "
                      f"({r['seconds']:.1f} s), {rate / workers / 1e6:.3f} per worker; "
                      f"{per_cpu / 1e6:.3f} M tokens per CPU second (all processes) = "
                      f"{per_cpu / top:.2f} x ceiling ({top / 1e6:.3f}: {r['ceiling'][0] / 1e6:.3f} "
                      f"before, {r['ceiling'][1] / 1e6:.3f} after)")
        for megabytes in () if "memory" in args.skip else (10, 100):
            inputs = write_inputs(root / f"mem{megabytes}", corpus_texts(megabytes), "jsonl.zst",
                                  shards=1)
            r = run(inputs, root / f"out-mem{megabytes}", tokenizer, 1, False)
            print(f"  {megabytes:3d} MB input, one source: peak memory {r['peak_mib']:.0f} MiB "
                  f"({r['tokens'] / 1e6:.1f} M tokens in {r['seconds']:.1f} s); resident MiB "
                  f"through the run: {r['series']}")


if __name__ == "__main__":
    main()
