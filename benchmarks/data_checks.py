"""How long the start-up data checks take for a directory of many shards (a recipe's DIR).

``megatron-tst train`` checks every indexed dataset before it starts (``data/build.py``
``check_run_data``): the directory's manifest is read and every shard's ``.idx`` and ``.bin``
checked (``data/blend.py``, ``data/checks.py``). This writes one small shard, hard-links it under
``N`` names with a manifest that lists them (what ``megatron-tst preprocess --output-dir`` writes),
and times the checks by phase, then the whole ``check_run_data``, for each ``N``:

    python benchmarks/data_checks.py                 # 1,000 and 10,000 shards
    python benchmarks/data_checks.py --shards 100 1000 10000 50000 --repeat 3

The files are in the page cache (just written): the figures are the CPU and system-call cost of
the checks. On a cold network file system each shard costs two ``stat``s, one open and a few
small reads of its ``.idx``, and one open and two small reads of its ``.bin``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_tst.config.loader import load_config
from megatron_tst.data.build import check_run_data, load_run_tokenizer
from megatron_tst.data.blend import resolve_blend
from megatron_tst.data.checks import (DataSource, SampleShape, SplitPart, check_split,
                                      check_token_ids)
from megatron_tst.data.manifest import (Manifest, ShardEntry, SourceFile, TokenizerInfo,
                                        ValidEntry, write_manifest)
from megatron_tst.data.tokenizer_files import file_sha256, open_tokenizer
from megatron_tst.plan import RunPlan

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat while the dog ran far away and then it slept".split()


def _tokenizer(root: Path) -> Path:
    from megatron_tst.data.tokenizer import train_sentencepiece

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=40)) + f" {i}" for i in range(400)]
    return train_sentencepiece(texts, root / "tok", vocab_size=300, seed=1)


def _one_shard(prefix: Path, documents: int, vocab: int, eod: int) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(1)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    tokens = 0
    for _ in range(documents):
        ids = np.append(rng.integers(0, vocab, size=int(rng.integers(50, 400))), eod)
        builder.add_document(ids.astype(np.uint16), [len(ids)])
        tokens += len(ids)
    builder.finalize(str(prefix) + ".idx")
    return tokens


def make_directory(root: Path, shards: int, model: Path, documents: int) -> Path:
    """``root``: ``shards`` hard links of one shard, a held-out set, and the manifest."""
    tok = open_tokenizer("sentencepiece", model)
    (root / "shards").mkdir(parents=True)
    one = root / "one"
    tokens = _one_shard(one, documents, tok.vocab_size, tok.eod)
    source = root / "source.jsonl"
    source.write_text("{}\n")
    of_source, entries = SourceFile.of(source), []
    for i in range(shards):
        prefix = f"shards/s{i:06d}_text_document"
        for suffix in (".bin", ".idx"):
            os.link(f"{one}{suffix}", root / (prefix + suffix))
        entries.append(ShardEntry(prefix, of_source, i, documents, tokens))
    for suffix in (".bin", ".idx"):
        os.link(f"{one}{suffix}", root / f"valid_text_document{suffix}")
    info = TokenizerInfo("sentencepiece", str(model), file_sha256(model), tok.vocab_size, tok.eod)
    write_manifest(root, Manifest(info, "text", None, tuple(entries),
                                  ValidEntry("valid_text_document", "documents", documents,
                                             documents, tokens)))
    return root


def time_checks(directory: Path, model: Path, run_dir: Path) -> dict[str, float]:
    cfg = load_config(REPO / "configs" / "demo-cpu.yaml", [
        "data.source=indexed", f"data.train_paths=[{directory}]",
        f"data.valid_paths=[{directory}]", f"data.tokenizer.path={model}",
        "data.tokenizer.type=sentencepiece", "logging.wandb=false", f"run_dir={run_dir}",
        "model.seq_length=128", "tst.bag_size=4", "training.train_steps=1000"])
    stream = RunPlan.build(cfg).stream
    tokenizer = load_run_tokenizer(cfg, light=True)
    times = {}
    tic = time.perf_counter()
    blend = resolve_blend([DataSource(str(directory), "data.train_paths[0]")],
                          [DataSource(str(directory), "data.valid_paths[0]")], None,
                          tokenizer_file=tokenizer.path, tokenizer_path=cfg.data.tokenizer.path)
    times["manifest + every .idx (resolve_blend)"] = time.perf_counter() - tic
    tic = time.perf_counter()
    for files in blend.train + blend.valid:
        check_token_ids(files, tokenizer.vocab_size, "tok", sample=blend.sample)
    sample = f"{blend.sample.sequences} x {blend.sample.tokens_per_sequence}"
    times[f"token ids ({sample} per file)"] = time.perf_counter() - tic
    tic = time.perf_counter()
    shape = SampleShape(stream.seq_length, stream.data_chunk, cfg.training.train_steps)
    check_split([SplitPart(f, 0, f.num_sequences, "the training data") for f in blend.train],
                weights=blend.train_weights, num_samples=stream.train_chunks, shape=shape,
                needs_all_samples=True, size_fix="")
    times["split sizes (check_split)"] = time.perf_counter() - tic
    tic = time.perf_counter()
    check_run_data(cfg, stream)
    times["check_run_data (all of it, tokenizer included)"] = time.perf_counter() - tic
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, nargs="*", default=[1_000, 10_000])
    p.add_argument("--documents", type=int, default=20, help="documents per shard")
    p.add_argument("--repeat", type=int, default=3, help="timings per size (the best is shown)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _tokenizer(root)
        for n in args.shards:
            tic = time.perf_counter()
            directory = make_directory(root / f"d{n}", n, model, args.documents)
            made = time.perf_counter() - tic
            runs = [time_checks(directory, model, root / "run") for _ in range(args.repeat)]
            print(f"\n{n:,} shards ({made:.1f} s to write the links and the manifest), best of "
                  f"{args.repeat}:")
            for phase in runs[0]:
                best = min(r[phase] for r in runs)
                print(f"  {phase:<52} {best:7.3f} s  ({best / n * 1e6:6.1f} us/shard)")


if __name__ == "__main__":
    main()
