"""Recipes that name directories and manifests (``megatron_tst.data.blend``): expansion into
shards, the weights megatron gets, the tokenizer check, the errors, a real training run on a
directory, and the start-up checks of 10,000 shards in bounded time."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from megatron_tst.config.loader import load_config
from megatron_tst.data.blend import expand_entry, resolve_blend, shard_weights
from megatron_tst.data.build import check_run_data
from megatron_tst.data.checks import DataSource, TokenSample, check_token_ids, token_sample
from megatron_tst.data.errors import DataError
from megatron_tst.data.manifest import (MANIFEST_NAME, Manifest, ShardEntry, SourceFile,
                                        TokenizerInfo, ValidEntry, write_manifest)
from megatron_tst.data.preprocess import preprocess
from megatron_tst.data.tokenizer_files import file_sha256
from megatron_tst.plan import RunPlan
from tests.conftest import read_metrics, run_cli, write_tiny_recipe


# ------------------------------------------------------------------------------------ helpers
def _shard(root: Path, prefix: str, texts: list[str], tokenizer) -> tuple[Path, int, int]:
    """One indexed dataset ``root/prefix`` of ``texts``: (jsonl input, documents, tokens)."""
    source = root / "inputs" / (prefix.replace("/", "_") + ".jsonl")
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = preprocess([source], root / prefix, tokenizer, progress=False)
    return source, result.num_documents, result.num_tokens


def _tokenizer_info(path: Path, tokenizer, kind: str = "sentencepiece") -> TokenizerInfo:
    return TokenizerInfo(kind, str(path), file_sha256(path), tokenizer.vocab_size, tokenizer.eod)


def make_dir(root: Path, parts: list[list[str]], tokenizer, sp_model: Path,
             valid: list[str] | None = None, kind: str = "sentencepiece") -> Path:
    """What ``megatron-tst preprocess --output-dir root`` writes: one shard per entry of
    ``parts`` under ``root/shards``, an optional held-out set, and ``manifest.json`` last."""
    shards = []
    for i, texts in enumerate(parts):
        prefix = f"shards/part-{i:03d}_text_document"
        source, documents, tokens = _shard(root, prefix, texts, tokenizer)
        shards.append(ShardEntry(prefix, SourceFile.of(source), 0, documents, tokens))
    valid_entry = None
    if valid is not None:
        _, documents, tokens = _shard(root, "valid_text_document", valid, tokenizer)
        valid_entry = ValidEntry("valid_text_document", "documents", len(valid), documents,
                                 tokens)
    write_manifest(root, Manifest(_tokenizer_info(sp_model, tokenizer, kind), "text", None,
                                  tuple(shards), valid_entry))
    return root


def sources(paths, key="data.train_paths"):
    return [DataSource(str(p), f"{key}[{i}]") for i, p in enumerate(paths)]


def tokens_of(files) -> list[int]:
    return [f.num_tokens for f in files]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, texts, sp_tokenizer, sp_model):
    """``dclm``: a directory of 3 shards with a held-out set; ``fineweb``: one shard."""
    root = tmp_path_factory.mktemp("blend")
    dclm = make_dir(root / "dclm", [texts[0:20], texts[20:50], texts[50:60]], sp_tokenizer,
                    sp_model, valid=texts[60:70])
    fineweb = make_dir(root / "fineweb", [texts[70:110]], sp_tokenizer, sp_model)
    _shard(root, "plain/web", texts[110:120], sp_tokenizer)
    return {"root": root, "dclm": dclm, "fineweb": fineweb, "prefix": str(root / "plain" / "web")}


def _resolve(train, valid=(), weights=None, sp_model=None):
    return resolve_blend(sources(train), sources(valid, "data.valid_paths"), weights,
                         tokenizer_file=sp_model, tokenizer_path=str(sp_model))


# ---------------------------------------------------------------------------------- expansion
def test_a_directory_and_its_manifest_expand_to_its_shards(two_sources, sp_model):
    d = two_sources["dclm"]
    shards = [str(d / "shards" / f"part-{i:03d}_text_document") for i in range(3)]
    for entry in (d, d / MANIFEST_NAME):
        blend = _resolve([entry], sp_model=sp_model)
        assert blend.train_prefixes == shards
        assert [f.source.key for f in blend.train] == ["data.train_paths[0]"] * 3
        assert blend.train[1].source.name == f"shard 1 of {entry} ({shards[1]})"
        assert blend.train[1].source.value == str(entry)
        assert blend.train_weights == tuple(float(t) for t in tokens_of(blend.train))
        assert blend.valid == () and len(blend.manifests) == 1
    assert expand_entry(DataSource(str(d), "k")).kind == "manifest"


def test_a_plain_directory_of_idx_files_is_read_recursively_in_order(two_sources, tmp_path,
                                                                     sp_tokenizer, texts):
    for name in ("b/x", "a/y", "a/z", "top"):
        _shard(tmp_path / "megatron_lm", name, texts[:5], sp_tokenizer)
    (tmp_path / "megatron_lm" / "orphan.idx").write_bytes(b"")  # no .bin: not a dataset
    blend = resolve_blend(sources([tmp_path / "megatron_lm"]), [], None)
    root = tmp_path / "megatron_lm"
    assert blend.train_prefixes == [str(root / p) for p in ("a/y", "a/z", "b/x", "top")]
    assert blend.train_entries[0].kind == "directory"
    assert blend.train_weights == tuple(float(t) for t in tokens_of(blend.train))


def test_prefixes_alone_behave_as_before(two_sources, sp_model):
    p = two_sources["prefix"]
    assert _resolve([p, p], sp_model=sp_model).train_weights is None
    blend = _resolve([p, p], weights=[3, 1], sp_model=sp_model)
    assert blend.train_prefixes == [p, p] and blend.train_weights == (3.0, 1.0)
    assert blend.train[0].source == DataSource(p, "data.train_paths[0]")


def test_a_prefix_and_a_directory_mixed(two_sources, sp_model):
    p, d = two_sources["prefix"], two_sources["dclm"]
    blend = _resolve([p, d], weights=[0.25, 0.75], sp_model=sp_model)
    assert blend.train_prefixes[0] == p and len(blend.train) == 4
    w = blend.train_weights
    assert w[0] == 0.25  # a prefix is one dataset with its whole weight
    assert sum(w[1:]) == pytest.approx(0.75)
    blend = _resolve([p, d], sp_model=sp_model)  # no weights: token counts, prefix included
    assert blend.train_weights == tuple(float(t) for t in tokens_of(blend.train))


def test_source_weights_keep_their_meaning_whatever_the_shard_counts(two_sources, sp_model):
    """0.5/0.5 over a 3-shard and a 1-shard source: each source's shards sum to 0.5, and within
    a source the weights follow the shards' tokens."""
    blend = _resolve([two_sources["dclm"], two_sources["fineweb"]], weights=[0.5, 0.5],
                     sp_model=sp_model)
    w, tokens = blend.train_weights, tokens_of(blend.train)
    assert len(w) == 4 and len(set(tokens[:3])) == 3
    assert sum(w[:3]) == pytest.approx(0.5) and w[3] == pytest.approx(0.5)
    for i in range(3):
        assert w[i] == pytest.approx(0.5 * tokens[i] / sum(tokens[:3]))
    assert shard_weights([[1, 3], [10]], [2, 1]) == [0.5, 1.5, 1.0]
    assert shard_weights([[1, 3], [10]], None) == [1.0, 3.0, 10.0]


def test_a_directory_in_valid_paths_is_its_held_out_set(two_sources, sp_model):
    d = two_sources["dclm"]
    blend = _resolve([d], [d], sp_model=sp_model)
    assert blend.valid_prefixes == [str(d / "valid_text_document")]
    assert blend.valid[0].source.key == "data.valid_paths[0]"
    assert "held-out" in blend.valid[0].source.name
    assert len(blend.train_weights) == 3  # validation datasets are not weighted


def test_token_sample_budget():
    assert token_sample(1) == TokenSample() == (32, 4096)
    assert token_sample(32) == (32, 4096)
    assert token_sample(10_000) == (2, 256)  # first and last of every file, always
    for n in (1, 10, 100, 1000, 10_000, 100_000):
        k, t = token_sample(n)
        assert 2 <= k <= 32 and 256 <= t <= 4096
        assert n * k <= max(1024, 2 * n) and n * k * t <= max(1 << 22, n * k * 256)


# --------------------------------------------------------------------------------------- errors
def _error(train, valid=(), sp_model=None, weights=None) -> DataError:
    with pytest.raises(DataError) as err:
        _resolve(train, valid, weights=weights, sp_model=sp_model)
    return err.value


def test_an_unfinished_preprocess_is_refused(tmp_path, sp_model):
    d = tmp_path / "half"
    (d / "shards").mkdir(parents=True)
    (d / "preprocess.json").write_text("{}")
    err = _error([d], sp_model=sp_model)
    assert err.key == "data.train_paths[0]" and err.value == str(d)
    assert "unfinished" in err.message and "--merge" in err.message
    assert f"--output-dir {d}" in err.message


@pytest.mark.parametrize("content, match", [
    ("{not json", "is damaged: not valid JSON"),
    ('{"format": "something-else", "version": 1}', "is not a manifest written by"),
    ('{"format": "megatron-tst-preprocess", "version": 1, "tokenizer": 3}', "is damaged"),
], ids=["not-json", "wrong-format", "wrong-field"])
def test_a_damaged_manifest_is_refused(tmp_path, sp_model, content, match):
    d = tmp_path / "damaged"
    d.mkdir()
    (d / MANIFEST_NAME).write_text(content)
    for entry in (d, d / MANIFEST_NAME):
        err = _error([entry], sp_model=sp_model)
        assert err.key == "data.train_paths[0]" and err.value == str(entry)
        assert match in err.message and str(d / MANIFEST_NAME) in err.message


def test_a_shard_changed_after_the_manifest_is_refused(two_sources, tmp_path, sp_tokenizer,
                                                       sp_model, texts):
    d = make_dir(tmp_path / "changed", [texts[:10], texts[10:20]], sp_tokenizer, sp_model)
    _shard(d, "shards/part-001_text_document", texts[10:25], sp_tokenizer)  # rewritten
    err = _error([two_sources["prefix"], d], sp_model=sp_model)
    assert err.key == "data.train_paths[1]" and err.value == str(d)
    assert f"shard 1 of {d} ({d}/shards/part-001_text_document)" in err.message
    assert "the shard changed after the manifest was written" in err.message
    assert str(d / MANIFEST_NAME) in err.message


def test_a_missing_shard_names_the_manifest(tmp_path, sp_tokenizer, sp_model, texts):
    d = make_dir(tmp_path / "lost", [texts[:10], texts[10:20]], sp_tokenizer, sp_model)
    os.unlink(d / "shards" / "part-000_text_document.bin")
    err = _error([d], sp_model=sp_model)
    assert "part-000_text_document.bin not found" in err.message
    assert f"listed in {d / MANIFEST_NAME}" in err.message


def test_another_tokenizer_is_refused(two_sources, synthetic_data):
    other = synthetic_data["tokenizer"]
    with pytest.raises(DataError) as err:
        resolve_blend(sources([two_sources["dclm"]]), [], None, tokenizer_file=other,
                      tokenizer_path="tok/other.model")
    err = err.value
    assert err.key == "data.tokenizer.path" and err.value == "tok/other.model"
    manifest = two_sources["dclm"] / MANIFEST_NAME
    for part in (str(manifest), str(other), "another tokenizer", "point data.tokenizer.path at",
                 "re-run `megatron-tst preprocess` with this tokenizer into a new directory"):
        assert part in err.message
    made_with = json.loads(manifest.read_text())["tokenizer"]["path"]
    assert made_with in err.message


def test_an_hf_tokenizer_given_as_its_directory_matches_its_tokenizer_json(
        tmp_path, tiny_recipe, texts, hf_json, hf_tokenizer):
    d = make_dir(tmp_path / "hf", [texts[:60], texts[60:]], hf_tokenizer, hf_json,
                 valid=texts[:20], kind="huggingface")
    cfg = load_config(tiny_recipe, [f"data.train_paths=[{d}]", f"data.valid_paths=[{d}]",
                                    "data.tokenizer.type=huggingface",
                                    f"data.tokenizer.path={hf_json.parent}"])
    check_run_data(cfg, RunPlan.build(cfg).stream)


def test_a_directory_without_datasets_is_refused(tmp_path, sp_model):
    d = tmp_path / "empty"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x.idx").write_bytes(b"")
    err = _error([d], sp_model=sp_model)
    assert err.key == "data.train_paths[0]"
    assert "no indexed datasets" in err.message and "none with its .bin" in err.message


def test_a_valid_entry_needs_a_held_out_set(two_sources, sp_model):
    f = two_sources["fineweb"]
    err = _error([f], [f], sp_model=sp_model)
    assert err.key == "data.valid_paths[0]" and err.value == str(f)
    assert "has no held-out validation set" in err.message
    assert "--valid-fraction F" in err.message and "--valid-documents N" in err.message


def test_recipe_errors_name_the_file_and_key(two_sources, tiny_recipe, sp_model, tmp_path):
    """Through check_run_data: the error starts with the recipe file and the entry's key."""
    half = tmp_path / "half"
    half.mkdir()
    (half / "preprocess.json").write_text("{}")
    text = tiny_recipe.read_text()
    cfg = load_config(tiny_recipe, [f"data.train_paths=[{two_sources['prefix']},{half}]",
                                    f"data.tokenizer.path={sp_model}"])
    with pytest.raises(DataError) as err:
        check_run_data(cfg, RunPlan.build(cfg).stream)
    assert str(err.value).startswith(f"command line: data.train_paths[1]='{half}': ")
    assert text == tiny_recipe.read_text()


# ----------------------------------------------------------------------------- runs and scale
def test_check_run_data_reads_directories(two_sources, tiny_recipe, sp_model):
    d, f = two_sources["dclm"], two_sources["fineweb"]
    for overrides in ([f"data.train_paths=[{d},{f}]", "data.train_weights=[0.5,0.5]",
                       f"data.valid_paths=[{d}]"],
                      [f"data.train_paths=[{f}]", "data.valid_paths=[]",
                       "training.eval_interval=0"],
                      [f"data.train_paths=[{d / MANIFEST_NAME}]", "tst.bag_size=2",
                       "tst.ratio=0.5", f"data.valid_paths=[{two_sources['prefix']}]"]):
        cfg = load_config(tiny_recipe, [*overrides, f"data.tokenizer.path={sp_model}"])
        check_run_data(cfg, RunPlan.build(cfg).stream)


@pytest.mark.slow  # the default suite trains on directories in tests/data/test_gpu_data_prep.py
def test_training_on_a_directory_of_shards(two_sources, tmp_path, synthetic_data, sp_model):
    """`megatron-tst train` with data.train_paths: [DIR] (3 shards and a manifest), TST on:
    megatron gets the 3 shards, weighted by their tokens."""
    d = two_sources["dclm"]
    recipe = write_tiny_recipe(tmp_path, synthetic_data)
    run = tmp_path / "run"
    run_cli(["train", str(recipe), f"run_dir={run}", f"data.train_paths=[{d}]",
             f"data.valid_paths=[{d}]", f"data.tokenizer.path={sp_model}", "tst.bag_size=2",
             "tst.superposition_steps=2", "training.train_steps=3", "training.eval_interval=3",
             "schedule.warmup_steps=1", "schedule.decay_fraction=0.3"])
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["bag_size"] for r in train] == [2, 2, 1]
    assert read_metrics(run, "valid")
    described = [json.loads(p.read_text())
                 for p in (run / "cache").rglob("*BlendedDataset-train-description.txt")]
    assert len(described) == 1, "megatron built one weighted blend of the shards"
    blend = _resolve([d], sp_model=sp_model)
    assert [x["dataset_path"] for x in described[0]["datasets"]] == blend.train_prefixes
    total = sum(tokens_of(blend.train))
    assert described[0]["weights"] == pytest.approx([t / total for t in tokens_of(blend.train)])


def _many_shards(root: Path, sp_tokenizer, sp_model, texts, count: int) -> Path:
    """``count`` shards and a held-out set: one small shard's files hard-linked under
    ``count + 1`` names, and the manifest that lists them."""
    one = root / "one"
    source, documents, tokens = _shard(one, "x_text_document", texts[:4], sp_tokenizer)
    (root / "shards").mkdir(parents=True)
    of_source, shards = SourceFile.of(source), []
    for i in range(count):
        prefix = f"shards/s{i:05d}_text_document"
        for suffix in (".bin", ".idx"):
            os.link(one / f"x_text_document{suffix}", root / (prefix + suffix))
        shards.append(ShardEntry(prefix, of_source, i, documents, tokens))
    for suffix in (".bin", ".idx"):
        os.link(one / f"x_text_document{suffix}", root / f"valid_text_document{suffix}")
    valid = ValidEntry("valid_text_document", "documents", documents, documents, tokens)
    write_manifest(root, Manifest(_tokenizer_info(sp_model, sp_tokenizer), "text", None,
                                  tuple(shards), valid))
    return root


def test_ten_thousand_shards_are_checked_in_bounded_time(tmp_path, tiny_recipe, sp_tokenizer,
                                                        sp_model, texts):
    """check_run_data on a directory of 10,000 shards: bounded per-file work (one open of each
    .idx, one of each .bin, a token sample with a total budget). About a second here
    (benchmarks/data_checks.py); the bound holds on a machine 10x slower. Every shard is
    checked: a damaged last one is found."""
    d = _many_shards(tmp_path / "many", sp_tokenizer, sp_model, texts, 10_000)
    cfg = load_config(tiny_recipe, [f"data.train_paths=[{d}]", f"data.valid_paths=[{d}]",
                                    f"data.tokenizer.path={sp_model}"])
    stream = RunPlan.build(cfg).stream
    tic = time.perf_counter()
    check_run_data(cfg, stream)
    assert time.perf_counter() - tic < 120
    assert token_sample(10_001) == (2, 256)
    last = d / "shards" / "s09999_text_document.bin"
    data = last.read_bytes()
    last.unlink()  # a file of its own, no longer a link
    last.write_bytes(data + b"\0\0")
    with pytest.raises(DataError) as err:
        check_run_data(cfg, stream)
    assert err.value.key == "data.train_paths[0]" and err.value.value == str(d)
    assert f"shard 9999 of {d}" in err.value.message and "bytes more than" in err.value.message


def test_the_budgeted_sample_still_finds_a_bad_id_in_the_last_sequence(tmp_path, sp_tokenizer,
                                                                       texts):
    import numpy as np

    _shard(tmp_path, "bad", texts[:30], sp_tokenizer)
    files = resolve_blend(sources([tmp_path / "bad"]), [], None).train[0]
    tokens = np.fromfile(str(tmp_path / "bad.bin"), dtype=np.uint16)
    tokens[files.pointer(files.num_sequences - 1) // 2] = 60_000  # first token of the last
    tokens.tofile(str(tmp_path / "bad.bin"))
    with pytest.raises(DataError, match=f"token id 60,000 in sequence {files.num_sequences - 1}"):
        check_token_ids(files, sp_tokenizer.vocab_size, "tok", sample=token_sample(10_000))
