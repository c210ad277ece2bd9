"""Sharded preprocessing (``megatron-tst preprocess --output-dir``): one shard per source or per
N documents, a manifest, byte-identical output whatever the workers and tasks, resume after
SIGKILL and SIGINT with no partial shard ever listed, the held-out split by document hash."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tst.data.errors import DataError
from megatron_tst.data.manifest import read_manifest
from megatron_tst.data.sharded import (SETTINGS_NAME, document_hash, preprocess_sharded,
                                       task_from_environment)
from tests.data.conftest import make_texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[list[str]]]:
    """Four sources in two subdirectories, one with an empty document."""
    texts = make_texts(200, seed=3)
    parts = [texts[0:60], texts[60:110], texts[110:170], texts[170:200]]
    parts[1] = parts[1][:10] + [""] + parts[1][10:]
    for k, part in enumerate(parts):
        write_jsonl(tmp_path / "raw" / f"d{k % 2}" / f"part-{k}.jsonl", part)
    return tmp_path / "raw", parts


def files_of(out_dir: Path) -> dict[str, str]:
    """sha256 of every file a reader uses (shards, held-out set, manifest), by relative path."""
    return {str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")
            and p.name != SETTINGS_NAME}


def documents_of(prefix: str, tokenizer) -> list[str]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [tokenizer.detokenize(dataset[i][:-1].tolist()) for i in range(len(dataset))]


def test_one_shard_per_source_and_a_manifest(tmp_path, corpus, sp_tokenizer):
    raw, parts = corpus
    result = preprocess_sharded([raw], tmp_path / "out", sp_tokenizer, log=lambda m: None)
    manifest = read_manifest(tmp_path / "out")
    assert result.manifest == manifest and result.shards_written == 4
    # sorted by path: d0/part-0, d0/part-2, d1/part-1, d1/part-3
    assert [s.prefix for s in manifest.shards] == [
        "shards/d0/part-0_text_document", "shards/d0/part-2_text_document",
        "shards/d1/part-1_text_document", "shards/d1/part-3_text_document"]
    by_source = {Path(s.source.path).name: s for s in manifest.shards}
    for k, part in enumerate(parts):
        shard = by_source[f"part-{k}.jsonl"]
        nonempty = [t for t in part if t.strip()]
        assert shard.documents == len(nonempty) and shard.skipped == len(part) - len(nonempty)
        assert documents_of(manifest.path_of(shard.prefix), sp_tokenizer) == nonempty
        assert shard.tokens == sum(len(sp_tokenizer.tokenize(t)) + 1 for t in nonempty)
    assert manifest.valid is None and manifest.skipped == 1
    assert manifest.tokenizer.vocab_size == sp_tokenizer.vocab_size
    assert manifest.tokenizer.sha256 == hashlib.sha256(Path(sp_tokenizer.path).read_bytes()).hexdigest()


def test_workers_tasks_and_chunks_give_identical_bytes(tmp_path, corpus, sp_tokenizer):
    raw, _ = corpus
    quiet = dict(log=lambda m: None, valid_fraction=0.1)
    preprocess_sharded([raw], tmp_path / "one", sp_tokenizer, **quiet)
    preprocess_sharded([raw], tmp_path / "two", sp_tokenizer, workers=2, **quiet)
    first = preprocess_sharded([raw], tmp_path / "tasks", sp_tokenizer, num_shards=3,
                               shard_index=0, **quiet)
    assert first.manifest is None and first.missing == 2  # tasks 1 and 2 have not run
    preprocess_sharded([raw], tmp_path / "tasks", sp_tokenizer, num_shards=3, shard_index=2,
                       workers=2, **quiet)
    assert not (tmp_path / "tasks" / "manifest.json").exists()
    last = preprocess_sharded([raw], tmp_path / "tasks", sp_tokenizer, num_shards=3,
                              shard_index=1, **quiet)
    assert last.manifest is not None  # the last task to finish writes the manifest
    reference = files_of(tmp_path / "one")
    assert files_of(tmp_path / "two") == reference
    assert files_of(tmp_path / "tasks") == reference


def test_shard_documents_splits_each_source(tmp_path, corpus, sp_tokenizer):
    raw, parts = corpus
    preprocess_sharded([raw], tmp_path / "out", sp_tokenizer, shard_documents=25,
                       log=lambda m: None)
    manifest = read_manifest(tmp_path / "out")
    first = [s for s in manifest.shards if s.source.path.endswith("part-0.jsonl")]
    assert [(s.prefix, s.chunk, s.documents) for s in first] == [
        ("shards/d0/part-0/00000_text_document", 0, 25),
        ("shards/d0/part-0/00001_text_document", 1, 25),
        ("shards/d0/part-0/00002_text_document", 2, 10)]
    got = [d for s in first for d in documents_of(manifest.path_of(s.prefix), sp_tokenizer)]
    assert got == parts[0]
    assert manifest.documents == sum(1 for p in parts for t in p if t.strip())


def test_held_out_split_by_document_hash(tmp_path, corpus, sp_tokenizer):
    raw, parts = corpus
    everything = [t for p in parts for t in p if t.strip()]
    preprocess_sharded([raw], tmp_path / "f", sp_tokenizer, valid_fraction=0.25,
                       log=lambda m: None)
    manifest = read_manifest(tmp_path / "f")
    held = documents_of(manifest.path_of(manifest.valid.prefix), sp_tokenizer)
    train = [d for s in manifest.shards for d in documents_of(manifest.path_of(s.prefix),
                                                               sp_tokenizer)]
    expected = {t for t in everything if document_hash(t) < 0.25 * 2 ** 64}
    assert set(held) == expected and not set(held) & set(train)
    assert sorted(held + train) == sorted(everything)
    assert 20 < len(held) < 80 and manifest.valid.documents == len(held)

    preprocess_sharded([raw], tmp_path / "n", sp_tokenizer, valid_documents=7, workers=2,
                       log=lambda m: None)
    manifest = read_manifest(tmp_path / "n")
    held = documents_of(manifest.path_of(manifest.valid.prefix), sp_tokenizer)
    assert sorted(map(document_hash, held)) == sorted(map(document_hash, everything))[:7]
    assert manifest.valid.rule == "documents" and manifest.valid.documents == 7
    assert manifest.documents == len(everything) - 7


def test_rerun_skips_done_shards_and_redoes_a_changed_source(tmp_path, corpus, sp_tokenizer):
    raw, parts = corpus
    out = tmp_path / "out"
    preprocess_sharded([raw], out, sp_tokenizer, log=lambda m: None)
    before = files_of(out)
    again = preprocess_sharded([raw], out, sp_tokenizer, log=lambda m: None)
    assert (again.shards_written, again.shards_skipped) == (0, 4) and files_of(out) == before
    write_jsonl(raw / "d1" / "part-3.jsonl", parts[3][:12])
    changed = preprocess_sharded([raw], out, sp_tokenizer, log=lambda m: None)
    assert (changed.shards_written, changed.shards_skipped) == (1, 3)
    shard = [s for s in read_manifest(out).shards if s.source.path.endswith("part-3.jsonl")][0]
    assert shard.documents == 12


def test_settings_of_a_directory_cannot_change(tmp_path, corpus, sp_tokenizer, hf_tokenizer):
    raw, _ = corpus
    out = tmp_path / "out"
    preprocess_sharded([raw], out, sp_tokenizer, valid_fraction=0.1, log=lambda m: None)
    for kwargs, pattern in (
            (dict(tokenizer=hf_tokenizer, valid_fraction=0.1), r"tokenizer: .*--hf-tokenizer"),
            (dict(tokenizer=sp_tokenizer, valid_fraction=0.2), r"valid_value: 0\.1 there, 0\.2 now"),
            (dict(tokenizer=sp_tokenizer, valid_fraction=0.1, text_key="body"), r"--text-key"),
            (dict(tokenizer=sp_tokenizer, valid_fraction=0.1, shard_documents=5),
             r"--shard-documents")):
        tokenizer = kwargs.pop("tokenizer")
        with pytest.raises(DataError, match=r"was started with other settings \(.*" + pattern
                           + r".*use a new --output-dir"):
            preprocess_sharded([raw], out, tokenizer, log=lambda m: None, **kwargs)
    (out / SETTINGS_NAME).write_text("{damaged")
    with pytest.raises(DataError, match="preprocess.json is damaged"):
        preprocess_sharded([raw], out, sp_tokenizer, valid_fraction=0.1, log=lambda m: None)


def test_refusals_before_anything_is_written(tmp_path, corpus, sp_tokenizer):
    raw, _ = corpus
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and was not written by megatron-tst"):
        preprocess_sharded([raw], foreign, sp_tokenizer, log=lambda m: None)
    for kwargs, pattern in ((dict(valid_fraction=1.5), "between 0 and 1"),
                            (dict(valid_documents=10_000), "at least as many documents"),
                            (dict(shard_documents=0), "--shard-documents must be >= 1"),
                            (dict(num_shards=2, shard_index=2), None)):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        if pattern is None:
            with pytest.raises(DataError, match="is not a task of --num-shards 2"):
                task_from_environment(2, 2)
            continue
        with pytest.raises(DataError, match=pattern):
            preprocess_sharded([raw], out, sp_tokenizer, log=lambda m: None, **kwargs)
        assert not out.exists() or not any(p.name != SETTINGS_NAME for p in out.rglob("*"))
    with pytest.raises(DataError, match=r"no documents found"):  # bad input in a source
        write_jsonl(raw / "d0" / "zz-empty.jsonl", [""])
        preprocess_sharded([raw], tmp_path / "bad", sp_tokenizer, log=lambda m: None)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_task_from_slurm_array_environment():
    env = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert task_from_environment(None, None, env) == (4, 2)
    assert task_from_environment(3, 1, env) == (3, 1)  # arguments win
    assert task_from_environment(None, None, {}) == (1, 0)
    with pytest.raises(DataError, match="go together"):
        task_from_environment(2, None, {})


def test_merge_names_what_is_missing(tmp_path, corpus, sp_tokenizer):
    raw, _ = corpus
    preprocess_sharded([raw], tmp_path / "out", sp_tokenizer, num_shards=2, shard_index=0,
                       log=lambda m: None)
    with pytest.raises(DataError, match=r"2 of 4 sources have no finished shards .*part-2\.jsonl"
                                        r".*run the preprocess tasks again"):
        preprocess_sharded([raw], tmp_path / "out", sp_tokenizer, merge_only=True,
                           log=lambda m: None)


def _cli(args: list[str], cwd: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_tst.cli", "preprocess", *args]


def _big_corpus(root: Path, sources: int = 8, docs: int = 600) -> Path:
    texts = make_texts(docs * 2, seed=5)
    for k in range(sources):
        write_jsonl(root / "raw" / f"s{k}.jsonl", texts[(k % 2) * docs:(k % 2 + 1) * docs])
    return root / "raw"


@pytest.mark.parametrize("sig", [
    signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["KILL", "INT"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, sp_model, sp_tokenizer,
                                                             sig):
    raw = _big_corpus(tmp_path)
    options = dict(valid_fraction=0.05, shard_documents=200)
    preprocess_sharded([raw], tmp_path / "ref", sp_tokenizer, log=lambda m: None, **options)
    out = tmp_path / "out"
    args = ["--input", str(raw), "--tokenizer-model", str(sp_model), "--valid-fraction", "0.05",
            "--shard-documents", "200", "--output-dir", str(out)]
    proc = subprocess.Popen(_cli(args, tmp_path), env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None:
        records = list(out.rglob("*_text_document.json"))
        if len(records) >= 2 and list(out.rglob(".*tmp*")):  # shards done, one being written
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=600)
    done = len(list(out.rglob("*_text_document.json")))
    assert 2 <= done < 24 and not (out / "manifest.json").exists()
    for record_path in out.rglob("*_text_document.json"):  # every recorded shard is whole
        record = json.loads(record_path.read_text())
        assert len(documents_of(str(out / record["prefix"]), sp_tokenizer)) == record["documents"]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "run the same command again to resume" in stderr
    resumed = preprocess_sharded([raw], out, sp_tokenizer, log=lambda m: None, **options)
    assert (resumed.shards_skipped, resumed.shards_written) == (done, 24 - done)
    assert files_of(out) == files_of(tmp_path / "ref")
    assert not [p for p in out.rglob(".*tmp*")]  # leftovers of the killed run are gone
    print(f"{sig.name}: {done} of 24 shards were recorded when the run stopped; the resumed run "
          f"skipped them and wrote the other {resumed.shards_written}: output identical to an "
          f"uninterrupted run")


def test_cli_refuses_flags_that_do_not_apply(tmp_path, corpus, sp_model):
    raw, _ = corpus

    def run(*args):
        return subprocess.run(_cli(list(args), tmp_path), capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)

    bad = run("--input", str(raw), "--output-prefix", "x", "--tokenizer-model", str(sp_model),
              "--valid-fraction", "0.1")
    assert bad.returncode == 1 and "--valid-fraction only apply with --output-dir" in bad.stderr
    bad = run("--input", str(raw), "--output-dir", "x", "--train-tokenizer")
    assert bad.returncode == 1 and "--output-dir needs the tokenizer file" in bad.stderr
    bad = run("--input", str(raw), "--output-dir", "x", "--output-prefix", "y")
    assert bad.returncode == 2 and "not allowed with argument" in bad.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("y*"))
