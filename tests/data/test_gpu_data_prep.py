"""docs/data.md "Preparing DCLM and FineWeb-Edu for the GPU recipes", exactly as written: its
``megatron-tst preprocess`` commands run on small files in the real formats (DCLM-style
``.jsonl.zst`` shards in their directory tree, FineWeb-Edu-style parquet shards, a dataset saved by
``datasets``' ``save_to_disk``, a byte-level BPE ``tokenizer.json`` trained here), then the
``10b-a1b`` recipe, shrunk to CPU size by overrides, trains through both TST phases on the result
with its own data paths, weights and tokenizer path. (Its Slurm array command runs on the real
Slurm cluster of the slow tests, tests/scripts/test_slurm.py.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, run_cli
from tests.data.conftest import build_hf_tokenizer_json, make_texts
from tests.models.test_sizing import SHRINK, SINGLE_RANK

SECTION = "## Preparing DCLM and FineWeb-Edu for the GPU recipes"
MOE = ["model.kv_channels=32", "model.num_moe_experts=4", "model.moe_router_topk=2",
       "model.moe_ffn_hidden_size=32", "tst.superposition_steps=2"]


def documented_commands(prefix: str) -> list[str]:
    """The commands of the section's ```bash blocks that start with ``prefix``, with their
    backslash continuations joined."""
    text = (REPO / "docs" / "data.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        commands += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    found = [re.sub(r"\s+", " ", c) for c in commands if c.startswith(prefix)]
    assert found, f"no `{prefix}` command in docs/data.md's section {SECTION!r}"
    return found


def _commands_in(text: str, prefix: str) -> set[str]:
    """Commands starting with ``prefix`` in a README code block or a recipe comment."""
    text = re.sub(r"^#\s?", "", text, flags=re.M).replace("\\\n", " ")
    return {re.sub(r"\s+", " ", line.split("  #")[0]).strip() for line in text.splitlines()
            if line.strip().startswith(prefix)}


def test_readme_and_recipe_name_the_documented_commands():
    """The README's and the GPU recipes' preprocess commands are ones the test below runs."""
    documented = set(documented_commands("megatron-tst preprocess --input 'dclm"))
    for path in (REPO / "README.md", REPO / "configs" / "base" / "gpu-pretrain.yaml"):
        found = _commands_in(path.read_text(), "megatron-tst preprocess --input 'dclm")
        assert found and found <= documented, (path, found, documented)


def write_corpora(root: Path) -> None:
    """DCLM, FineWeb-Edu and an HF dataset as they ship, with different documents each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = make_texts(22000, seed=11)
    dclm = [texts[i:i + 2500] for i in range(0, 10000, 2500)]
    for k, docs in enumerate(dclm):
        path = (root / "dclm" / f"global-shard_0{k // 2 + 1}_of_10" / "local-shard_0_of_10"
                / f"shard_0000000{k % 2}_processed.jsonl.zst")
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"text": t, "url": f"https://example.org/{k}/{i}"}) + "\n"
                        for i, t in enumerate(docs))
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    for k in range(3):
        path = root / "fineweb-edu" / "data" / f"CC-MAIN-2024-1{k}" / "000_00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        docs = texts[10000 + 3000 * k:13000 + 3000 * k]
        table = pa.table({"text": docs, "id": [f"<urn:{k}:{i}>" for i in range(len(docs))],
                          "score": [3.5] * len(docs)})
        pq.write_table(table, path, row_group_size=700)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": texts[19000:]}).save_to_disk(
        str(root / "my-corpus-hf"), num_shards=2)
    tokenizer = root / "tokenizers" / "llama3" / "tokenizer.json"
    tokenizer.parent.mkdir(parents=True)
    build_hf_tokenizer_json(tokenizer, texts[:3000], ["<|begin_of_text|>", "<|end_of_text|>"])


def test_documented_preparation_then_the_10b_a1b_recipe_trains(tmp_path):
    write_corpora(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    for command in documented_commands("megatron-tst preprocess"):
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        out_dir = tmp_path / shlex.split(command)[shlex.split(command).index("--output-dir") + 1]
        manifest = json.loads((out_dir / "manifest.json").read_text())
        assert manifest["valid"]["documents"] > 0 and manifest["documents"] > 0, command
        lines = result.stdout.strip().splitlines()
        assert f"{out_dir.relative_to(tmp_path)}/manifest.json: " in lines[-1], result.stdout
        assert sum(line.startswith("shard done: shards/") for line in lines) == \
            len(manifest["shards"]), result.stdout  # one log line per finished shard

    dclm = json.loads((tmp_path / "data/dclm/manifest.json").read_text())
    assert [s["prefix"] for s in dclm["shards"]] == [
        f"shards/global-shard_0{g}_of_10/local-shard_0_of_10/shard_0000000{k}_processed_text_document"
        for g in (1, 2) for k in (0, 1)]
    assert dclm["documents"] + dclm["valid"]["documents"] == 10000
    fineweb = json.loads((tmp_path / "data/fineweb-edu/manifest.json").read_text())
    assert len(fineweb["shards"]) == 3
    assert fineweb["documents"] + fineweb["valid"]["documents"] == 9000
    mine = json.loads((tmp_path / "data/my-corpus/manifest.json").read_text())
    assert mine["valid"]["documents"] == 1000 and len(mine["shards"]) == 2

    run_dir = tmp_path / "run"
    run_cli(["train", str(REPO / "configs" / "10b-a1b.yaml"), *SINGLE_RANK, *SHRINK, *MOE,
             "training.eval_interval=2", "training.eval_steps=1", f"run_dir={run_dir}"],
            cwd=tmp_path, timeout=1800)
    train = read_metrics(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[0]["phase"] == "superposition" and train[-1]["phase"] == "recovery"
    assert all(r["loss"] == r["loss"] for r in train)
    assert [r["step"] for r in read_metrics(run_dir, "valid")] == [2, 4]
