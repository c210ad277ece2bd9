"""A larger English corpus for the equal-FLOPs study: the Linux kernel's Documentation tree.

Debian's `linux-doc-6.1` package (`apt-get install linux-doc-6.1`) holds it as gzipped
reStructuredText and plain text (~24 MB of English prose). This script writes one JSONL document
per .rst/.txt file, split deterministically by path hash into train (98%) and valid (2%), then
tokenizes both with `megatron-tst preprocess` (a sentencepiece tokenizer trained on train only).

    python benchmarks/prepare_linux_doc.py --out data/linux-doc --vocab-size 8192
Then point a recipe at <out>/train, <out>/valid and <out>/train.tokenizer.model.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path("/usr/share/doc/linux-doc-6.1/Documentation")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    files = sorted(f for ext in ("*.rst.gz", "*.txt.gz") for f in a.root.rglob(ext))
    if not files:
        sys.exit(f"no .rst.gz/.txt.gz files under {a.root}: apt-get install linux-doc-6.1")
    a.out.mkdir(parents=True, exist_ok=True)
    splits = {"train": open(a.out / "train.jsonl", "w"), "valid": open(a.out / "valid.jsonl", "w")}
    counts = {"train": 0, "valid": 0}
    for f in files:
        text = gzip.open(f, "rt", encoding="utf-8", errors="replace").read().strip()
        if len(text) < 200:
            continue
        rel = str(f.relative_to(a.root))
        split = "valid" if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 50 == 0 else "train"
        splits[split].write(json.dumps({"text": text, "path": rel}) + "\n")
        counts[split] += 1
    for f in splits.values():
        f.close()
    print(f"documents: {counts}")
    cli = [sys.executable, "-m", "megatron_tst.cli", "preprocess"]
    subprocess.run([*cli, "--input", str(a.out / "train.jsonl"), "--output-prefix", str(a.out / "train"),
                    "--train-tokenizer", "--vocab-size", str(a.vocab_size),
                    "--workers", str(a.workers)], check=True)
    subprocess.run([*cli, "--input", str(a.out / "valid.jsonl"), "--output-prefix", str(a.out / "valid"),
                    "--tokenizer-model", str(a.out / "train.tokenizer.model"),
                    "--workers", str(a.workers)], check=True)


if __name__ == "__main__":
    main()
