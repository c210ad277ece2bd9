"""Throughput and memory of ``megatron-tst preprocess --output-dir`` against its ceiling.

The ceiling is the tokenizer's own batch encoding (``tokenizers``' ``encode_batch_fast``, one
thread, 64 documents a call)
of the same documents already in memory: what preprocessing would reach if reading,
decompressing, parsing, hashing for the held-out split and writing the shards cost nothing.
Throughput is measured for 1 and 2 workers on ``.jsonl.zst`` and parquet inputs (8 shards each),
per worker, against that ceiling (target: at least 0.85). Peak memory (the preprocess process and
its workers, resident set) is measured for a 10 MB and a 100 MB input, one source each: it must
not grow with the input.

    python benchmarks/preprocess_throughput.py

Text: the demo corpus (real English: Wikipedia pages and news, from the installed gensim
package), repeated to the sizes needed; tokenizer: a byte-level BPE of 32,000 entries trained on
it with ``tokenizers``. Every process tokenizes on one thread (``RAYON_NUM_THREADS=1``), as each
worker of a real run does when ``--workers`` equals the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


def ceiling(tokenizer_path: Path, texts: list[str]) -> tuple[float, int]:
    """(tokens per second, tokens) of encode_batch on in-memory texts, one thread."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encode(texts[:64])  # warm up
    best = 0.0
    for _ in range(2):
        tic = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), 64):
            tokens += sum(len(e.ids) + 1 for e in encode(texts[i:i + 64], add_special_tokens=False))
        best = max(best, tokens / (time.perf_counter() - tic))
    return best, tokens


def run_preprocess(inputs: Path, out: Path, tokenizer_path: Path, workers: int) -> dict:
    """One ``preprocess --output-dir`` in a fresh process: its tokens/s (after start-up) and
    peak resident memory (itself and its workers)."""
    code = f"""
import json, resource, sys, threading, time
samples = []
def sample():
    while True:
        with open("/proc/self/statm") as f:
            samples.append((time.perf_counter(), int(f.read().split()[1]) * 4096 / 2**20))
        time.sleep(0.25)
threading.Thread(target=sample, daemon=True).start()
from megatron_tst.data.tokenizer import load_tokenizer
from megatron_tst.data.sharded import preprocess_sharded
tok = load_tokenizer("huggingface", {str(tokenizer_path)!r})
tic = time.perf_counter()
r = preprocess_sharded([{str(inputs)!r}], {str(out)!r}, tok, workers={workers},
                       valid_fraction=0.001, progress=False, log=lambda m: None)
seconds = time.perf_counter() - tic
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
during = [m for t, m in samples if t >= tic]
print(json.dumps({{"tokens": r.tokens, "seconds": seconds, "rss_mib": rss / 1024,
                  "first_tenth_mib": max(m for t, m in samples if t <= tic + seconds / 10),
                  "series": [round(m) for m in during[::max(1, len(during) // 12)]]}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--megabytes", type=float, default=40.0,
                   help="text for the throughput runs (default 40 MB)")
    p.add_argument("--vocab-size", type=int, default=32000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = corpus_texts(args.megabytes)
        tokenizer = train_tokenizer(root / "tokenizer.json", texts[:400], args.vocab_size)
        ceiling_rate, _ = ceiling(tokenizer, texts)
        print(f"{sum(len(t.encode()) for t in texts) / 1e6:.1f} MB of text, {len(texts):,} "
              f"documents, {os.cpu_count()} CPUs; ceiling (encode_batch in memory, 1 thread): "
              f"{ceiling_rate / 1e6:.3f} M tokens/s")
        for fmt in ("jsonl.zst", "parquet"):
            inputs = write_inputs(root / "in", texts, fmt, shards=8)
            for workers in (1, 2):
                r = run_preprocess(inputs, root / f"out-{fmt}-{workers}", tokenizer, workers)
                rate = r["tokens"] / r["seconds"]
                print(f"  {fmt:9s} {workers} worker(s): {rate / 1e6:.3f} M tokens/s, "
                      f"{rate / workers / 1e6:.3f} per worker = "
                      f"{rate / workers / ceiling_rate:.2f} x ceiling ({r['seconds']:.1f} s)")
        for megabytes in (10, 100):
            inputs = write_inputs(root / f"mem{megabytes}", corpus_texts(megabytes), "jsonl.zst",
                                  shards=1)
            r = run_preprocess(inputs, root / f"out-mem{megabytes}", tokenizer, 1)
            print(f"  {megabytes:3d} MB input, one source: peak memory {r['rss_mib']:.0f} MiB "
                  f"({r['tokens'] / 1e6:.1f} M tokens in {r['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
