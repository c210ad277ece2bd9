"""Every bad input to ``megatron-tst train`` ends as ONE paragraph on stderr, exit status 2, before
training starts: ``megatron-tst: configuration error: ...`` or ``megatron-tst: data error: ...``,
naming the file, the key, the value and the fix, and never a traceback.

Recipe cases run ``megatron_tst.cli.main`` in this process (the code ``python -m
megatron_tst.cli`` runs; they fail in ``load_config`` before anything is imported or started):
their recipes name a data prefix that does not exist, so a recipe that wrongly passed would still
stop at the data check, before any process group, and fail the test by naming the wrong key. A few
of them also run through the real CLI in a subprocess, with the same result. Data cases damage
copies of the ``synthetic_data`` files in ``tmp_path`` and run the real CLI in subprocesses,
several at once.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_tst import cli
from tests.conftest import WORDS, run_cli, write_tiny_recipe

MAX_CHARS = 2000  # megatron_tst.config.errors.MAX_MESSAGE_CHARS, plus the CLI's prefix


def assert_one_paragraph(rc: int, stderr: str, expected: list[str], *,
                         after_start: bool = False) -> str:
    """Exit status 2; the error is one line that holds every expected piece; no traceback.
    ``after_start``: the error comes after megatron-core was imported (its warnings and the
    run's log lines may precede it), so only the last line is the error."""
    assert rc == 2, f"exit status {rc}, stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    if not after_start:
        assert len(lines) == 1, f"more than one line on stderr:\n{stderr[-3000:]}"
    error = lines[-1]
    assert error.startswith(("megatron-tst: configuration error: ", "megatron-tst: data error: "))
    assert len(error) <= MAX_CHARS + 40, error
    for piece in expected:
        assert piece in error, f"{piece!r} not in: {error}"
    return error


# ------------------------------------------------------------------------------- recipe cases
SMALL = {
    "name": "bad",
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32},
    "training": {"train_steps": 10, "micro_batch_size": 2, "global_batch_size": 4,
                 "eval_interval": 0},
    "schedule": {"warmup_steps": 2, "decay_fraction": 0.2},
    "logging": {"wandb": False},
}


def _merged(tree: dict, update: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _base(tmp: Path) -> dict:
    # A recipe that passes every recipe check; its data is a tripwire (see the module docstring).
    return _merged(SMALL, {"run_dir": str(tmp / "run"), "data": {
        "source": "indexed", "train_paths": [str(tmp / "tripwire")],
        "tokenizer": {"path": str(tmp / "tripwire.model")}}})


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content))
    return path


# id -> (recipe: a dict merged into the base, a YAML text, bytes or a callable(tmp) -> path;
#        overrides; expected pieces of the message ("{tmp}" = the test's directory); environment)
RECIPE_CASES = {
    # YAML that is not a recipe
    "yaml-syntax": ("model:\n  num_layers: 2\n   hidden_size: 64\n", [],
                    ["recipe.yaml", "not valid YAML", "line 3"], {}),
    "yaml-unclosed-bracket": ("model: {num_layers: 2\ntraining: {}\n", [],
                              ["recipe.yaml", "not valid YAML"], {}),
    "yaml-tab-indent": ("model:\n\tnum_layers: 2\n", [], ["recipe.yaml", "not valid YAML"], {}),
    "yaml-list": ("- model\n- training\n", [], ["recipe.yaml", "must be a mapping", "list"], {}),
    "yaml-scalar": ("just some words\n", [], ["recipe.yaml", "must be a mapping", "str"], {}),
    "yaml-duplicate-key": ("training:\n  train_steps: 5\n  train_steps: 6\n", [],
                           ["recipe.yaml", "'train_steps' appears twice", "line 3"], {}),
    "not-utf8": (b"name: caf\xe9\n", [], ["recipe.yaml", "not UTF-8"], {}),
    # wrong types
    "str-for-int": ({"model": {"num_layers": "two"}}, [],
                    ["recipe.yaml", "model.num_layers='two'", "expected an integer"], {}),
    "float-for-int": ({"training": {"train_steps": 2.5}}, [],
                      ["training.train_steps=2.5", "expected an integer"], {}),
    "bool-for-int": ({"training": {"micro_batch_size": True}}, [],
                     ["training.micro_batch_size=True", "expected an integer"], {}),
    "list-for-bool": ({"logging": {"wandb": [True]}}, [],
                      ["logging.wandb=[True]", "expected true or false"], {}),
    "mapping-for-number": ({"optimizer": {"lr": {"peak": 1}}}, [],
                           ["optimizer.lr=", "expected a number"], {}),
    "str-for-list": ({"data": {"train_paths": "a,b"}}, [],
                     ["data.train_paths='a,b'", "expected a list"], {}),
    "scalar-for-section": ({"model": 3}, [], ["recipe.yaml", "model=3", "expected a section"], {}),
    "nan-number": ("optimizer:\n  lr: .nan\n", [], ["optimizer.lr", "finite number"], {}),
    "bad-choice": ({"model": {"normalization": "rmsnorm"}}, [],
                   ["model.normalization='rmsnorm'", "did you mean 'RMSNorm'"], {}),
    # unknown keys, at every level, with a did-you-mean
    "unknown-top-key": ({"modle": {"num_layers": 2}}, [],
                        ["recipe.yaml", "modle=", "did you mean 'model'"], {}),
    "unknown-section-key": ({"model": {"hiden_size": 64}}, [],
                            ["model.hiden_size=64", "did you mean 'model.hidden_size'"], {}),
    "unknown-nested-key": ({"data": {"tokenizer": {"kind": "sentencepiece"}}}, [],
                           ["data.tokenizer.kind=", "did you mean 'data.tokenizer.type'"], {}),
    "unknown-override": ({}, ["optimizer.lrr=1e-3"],
                         ["command line", "optimizer.lrr", "did you mean 'optimizer.lr'"], {}),
    "override-without-value": ({}, ["optimizer.lr"],
                               ["command line", "'optimizer.lr'", "section.key=value"], {}),
    "huge-unknown-value": ({"extra": {f"k{i}": list(range(50)) for i in range(500)}}, [],
                           ["extra=", "unknown key"], {}),
    # impossible parallel layouts
    "tp-not-dividing-heads": ({"parallel": {"tensor_model_parallel_size": 3}}, [],
                              ["parallel.tensor_model_parallel_size=3",
                               "must divide model.num_attention_heads=4"], {}),
    "pp-not-dividing-layers": ({"parallel": {"pipeline_model_parallel_size": 3}}, [],
                               ["parallel.pipeline_model_parallel_size=3",
                                "must divide model.num_layers=2"], {}),
    "ep-without-experts": ({"parallel": {"expert_model_parallel_size": 2}}, [],
                           ["parallel.expert_model_parallel_size=2", "model.num_moe_experts"], {}),
    "world-size-mismatch": ({"parallel": {"tensor_model_parallel_size": 2}}, [],
                            ["parallel.tensor_model_parallel_size=2", "world size 3"],
                            {"WORLD_SIZE": "3"}),
    "batch-not-dividing": ({"training": {"global_batch_size": 6, "micro_batch_size": 4}}, [],
                           ["training.global_batch_size=6", "micro_batch_size"], {}),
    "context-parallel": ({"parallel": {"context_parallel_size": 2}}, [],
                         ["parallel.context_parallel_size=2", "not supported"], {}),
    "sequence-parallel-without-tp": ({"parallel": {"sequence_parallel": True}}, [],
                                     ["parallel.sequence_parallel=True"], {}),
    # values out of range
    "negative-lr": ({"optimizer": {"lr": -1e-3}}, [], ["optimizer.lr=-0.001", "positive"], {}),
    "warmup-longer-than-run": ({"schedule": {"warmup_steps": 50}}, [],
                               ["schedule.warmup_steps=50", "training.train_steps=10"], {}),
    "ratio-above-one": ({"tst": {"bag_size": 4, "ratio": 1.5}}, [], ["tst.ratio=1.5"], {}),
    "bag-size-zero": ({"tst": {"bag_size": 0}}, [], ["tst.bag_size=0", ">= 1"], {}),
    "bag-size-without-ratio": ({"tst": {"bag_size": 4}}, [], ["tst.bag_size=4", "tst.ratio"], {}),
    "seq-length-zero": ({}, ["model.seq_length=0"],
                        ["command line", "model.seq_length=0", "positive"], {}),
    "zero-train-steps": ({"training": {"train_steps": 0}}, [], ["training.train_steps=0"], {}),
    "decay-fraction": ({"schedule": {"decay_fraction": 2}}, [], ["schedule.decay_fraction=2"], {}),
    "unknown-signal": ({"training": {"exit_signals": ["SIGFOO"]}}, [],
                       ["training.exit_signals=['SIGFOO']", "unknown signal"], {}),
    "no-train-paths": ({"data": {"train_paths": []}}, [], ["data.train_paths=[]", "demo"], {}),
    # recipe files
    "missing-recipe": (lambda tmp: tmp / "nowhere.yaml", [],
                       ["recipe file not found", "nowhere.yaml"], {}),
    "recipe-is-directory": (lambda tmp: tmp, [], ["is a directory"], {}),
    "missing-base": ({"base": "nothere.yaml"}, [],
                     ["nothere.yaml", "not found", "named as base by", "recipe.yaml"], {}),
    "base-cycle": (lambda tmp: _write(tmp / "a.yaml", {"base": "b.yaml"}) and _write(
        tmp / "b.yaml", {"base": "a.yaml"}) and tmp / "a.yaml", [],
                   ["inheritance cycle", "a.yaml", "b.yaml"], {}),
    "base-not-a-path": ({"base": 3}, [], ["recipe.yaml", "base must be a recipe path"], {}),
}


def _recipe_case(tmp: Path, spec) -> Path:
    if callable(spec):
        return spec(tmp)
    if isinstance(spec, dict):
        return _write(tmp / "recipe.yaml", _merged(_base(tmp), spec))
    return _write(tmp / "recipe.yaml", spec)


def _run_in_process(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = cli.main(["train", *args])
    except SystemExit as exit_:  # argparse errors
        rc = exit_.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe(case, tmp_path, capsys, monkeypatch):
    spec, overrides, expected, env = RECIPE_CASES[case]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    recipe = _recipe_case(tmp_path, spec)
    rc, stderr = _run_in_process(capsys, [str(recipe), *overrides])
    assert_one_paragraph(rc, stderr, [p.replace("{tmp}", str(tmp_path)) for p in expected])


def test_unreadable_recipe(tmp_path, capsys):
    recipe = _write(tmp_path / "recipe.yaml", _base(tmp_path))
    recipe.chmod(0)
    expected = ["recipe.yaml", "cannot read the recipe", "Permission denied"]
    if os.geteuid() == 0:  # root reads any file: use one whose read fails (EIO) instead
        if not Path("/proc/self/mem").is_file():
            pytest.skip("root reads any file, and there is no /proc/self/mem")
        recipe, expected = Path("/proc/self/mem"), ["mem: cannot read the recipe"]
    rc, stderr = _run_in_process(capsys, [str(recipe)])
    assert_one_paragraph(rc, stderr, expected)


def test_empty_sections_and_files_are_defaults(tmp_path, capsys):
    """``model:`` with every key commented out, or an empty base file, mean "the defaults": the
    recipe loads and the run stops at the tripwire data, not at the recipe."""
    _write(tmp_path / "empty.yaml", "# nothing yet\n")
    recipe = _write(tmp_path / "recipe.yaml",
                    yaml.safe_dump(_merged(_base(tmp_path), {"base": "empty.yaml"})) + "tst:\n")
    rc, stderr = _run_in_process(capsys, [str(recipe)])
    assert_one_paragraph(rc, stderr, ["data.tokenizer.path", "tripwire.model", "not found"])


# Range checks of RunConfig.validate: without them megatron or torch refuse these only once the
# run is being built (a traceback), or train with them silently.
SCHEMA_RANGES = {
    "dropout-above-one": ["model.hidden_dropout=1.5"],
    "negative-weight-decay": ["optimizer.weight_decay=-0.1"],
    "beta-above-one": ["optimizer.adam_beta1=1.5"],
    "zero-adam-eps": ["optimizer.adam_eps=0"],
    "negative-clip-grad": ["optimizer.clip_grad=-1"],
    "zero-ffn-hidden-size": ["model.ffn_hidden_size=0"],
    "zero-rotary-base": ["model.rotary_base=0"],
    "zero-experts": ["model.num_moe_experts=0"],
    "zero-norm-epsilon": ["model.norm_epsilon=0"],
    "absurd-steps": ["training.train_steps=10000000000"],
}


@pytest.mark.parametrize("case", list(SCHEMA_RANGES))
def test_value_ranges(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = _write(tmp_path / "recipe.yaml", _base(tmp_path))
    overrides = SCHEMA_RANGES[case]
    rc, stderr = _run_in_process(capsys, [str(recipe), *overrides])
    assert_one_paragraph(rc, stderr, [overrides[0].partition("=")[0]])


# --------------------------------------------------------------------- data (real subprocesses)
def _write_indexed(prefix: Path, docs: list, dtype=np.uint16) -> Path:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return prefix


def _copy(src: str, dst: Path, suffixes=(".bin", ".idx")) -> Path:
    for suffix in suffixes:
        shutil.copy(src + suffix, str(dst) + suffix)
    return dst


def _hf_tokenizer(path: Path, special_tokens: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    tokenizer.save(str(path))
    return path


def _truncated_bin(d, t):
    p = _copy(d["train"], t / "cut")
    Path(str(p) + ".bin").write_bytes(Path(d["train"] + ".bin").read_bytes()[:1000])
    return ([f"data.train_paths=[{p}]"],
            ["data.train_paths[0]", "cut.bin has 1,000 bytes", "truncated"])


def _other_index(d, t):
    p = t / "pair"
    shutil.copy(d["train"] + ".idx", str(p) + ".idx")
    shutil.copy(d["valid"] + ".bin", str(p) + ".bin")
    return [f"data.train_paths=[{p}]"], ["pair.bin", "not a pair", "the .idx of another dataset"]


def _other_index_bigger_bin(d, t):
    p = t / "pair"
    shutil.copy(d["valid"] + ".idx", str(p) + ".idx")
    shutil.copy(d["train"] + ".bin", str(p) + ".bin")
    return ([f"data.valid_paths=[{p}]"],
            ["data.valid_paths[0]", "bytes more than its index describes", "not a pair"])


def _dtype_mismatch(d, t):
    p = _copy(d["train"], t / "wide", (".idx",))
    np.fromfile(d["train"] + ".bin", dtype=np.uint16).astype(np.int32).tofile(str(p) + ".bin")
    return [f"data.train_paths=[{p}]"], ["wide.bin", "int32-sized ids", "disagree on the token dtype"]


def _not_indexed(d, t):
    p = t / "text"
    Path(str(p) + ".bin").write_text("the cat sat on the mat\n")
    Path(str(p) + ".idx").write_text("the cat sat on the mat\n")
    return [f"data.train_paths=[{p}]"], ["text.idx is not a megatron indexed-dataset index"]


def _truncated_idx(d, t):
    p = _copy(d["train"], t / "cutidx")
    Path(str(p) + ".idx").write_bytes(Path(d["train"] + ".idx").read_bytes()[:100])
    return [f"data.train_paths=[{p}]"], ["cutidx.idx is truncated", "270 sequences"]


def _empty_dataset(d, t):
    p = _write_indexed(t / "empty", [])
    return [f"data.valid_paths=[{p}]"], ["data.valid_paths[0]", "has no documents"]


def _ids_from_bigger_tokenizer(d, t):
    rng = np.random.default_rng(0)
    p = _write_indexed(t / "big", [rng.integers(0, 400, 200) for _ in range(50)])
    return ([f"data.train_paths=[{p}]"],
            ["data.train_paths[0]", "big.bin", "outside the vocabulary", "tok.model",
             "another tokenizer"])


def _dtype_too_small(d, t):
    from megatron_tst.data.tokenizer_files import open_sentencepiece
    from megatron_tst.data.tokenizer import train_sentencepiece

    model = train_sentencepiece([" ".join(WORDS)] * 50, t / "tok300", vocab_size=300)
    vocab = open_sentencepiece(model).vocab_size
    rng = np.random.default_rng(0)
    p = _write_indexed(t / "bytes", [rng.integers(0, 250, 100) for _ in range(50)], np.uint8)
    return ([f"data.train_paths=[{p}]", f"data.valid_paths=[{p}]", f"data.tokenizer.path={model}"],
            ["bytes.bin stores token ids as uint8", f"{vocab:,} entries"])


def _empty_valid_split(d, t):
    p = _write_indexed(t / "ten", [np.arange(5, 90) for _ in range(10)])
    return ([f"data.train_paths=[{p}]", "data.valid_paths=[]"],
            ["the validation split (2%) of", "has no documents", "data.valid_paths"])


def _valid_too_short(d, t):
    p = _write_indexed(t / "short", [np.arange(5, 15)])
    return ([f"data.valid_paths=[{p}]"],
            ["model.seq_length=32", "short holds 10 tokens", "fewer than one sample"])


def _seq_length_too_long(d, t):
    return (["model.seq_length=20000"],
            ["command line: model.seq_length=20000", "holds 17,452 tokens", "20,001"])


def _tst_seq_length_too_long(d, t):
    return (["model.seq_length=1024", "tst.bag_size=32", "tst.ratio=0.5"],
            ["model.seq_length=1024", "model.seq_length x tst.bag_size = 1,024 x 32 = 32,768",
             "tst.bag_size"])


def _unweighted_blend(d, t):
    return ([f"data.train_paths=[{d['train']},{d['valid']}]", "training.train_steps=1000"],
            ["data.train_paths=", "without weights", "data.train_weights"])


def _absurd_steps(d, t):
    # below the schema's 10^9 bound: the data check finds it too large for megatron's index
    return (["training.train_steps=900000000", "training.global_batch_size=4096"],
            ["training.train_steps=900000000", "lower training.train_steps"])


def _missing_bin(d, t):
    p = _copy(d["train"], t / "half", (".idx",))
    return [f"data.train_paths=[{p}]"], ["half.bin not found", "half.idx is there"]


def _missing_idx(d, t):
    p = _copy(d["valid"], t / "half", (".bin",))
    return [f"data.valid_paths=[{p}]"], ["data.valid_paths[0]", "half.idx not found"]


def _prefix_with_suffix(d, t):
    return ([f"data.train_paths=[{d['train']}.bin]"],
            ["looks like one of the two files", f"give {d['train']} instead"])


def _missing_tokenizer(d, t):
    return ([f"data.tokenizer.path={t}/nope.model"],
            ["data.tokenizer.path=", "nope.model not found"])


def _sentencepiece_as_hf(d, t):
    return (["data.tokenizer.type=huggingface"],
            ["data.tokenizer.type='huggingface'", "tok.model is a sentencepiece tokenizer",
             "set data.tokenizer.type=sentencepiece"])


def _hf_as_sentencepiece(d, t):
    path = _hf_tokenizer(t / "tokenizer.json", ["<|endoftext|>"])
    return ([f"data.tokenizer.path={path}"],
            ["tokenizer.json is a huggingface tokenizer", "set data.tokenizer.type=huggingface"])


def _hf_directory_as_sentencepiece(d, t):
    _hf_tokenizer(t / "tokenizer.json", ["<|endoftext|>"])
    return ([f"data.tokenizer.path={t}"],
            ["Hugging Face tokenizer directory", "set data.tokenizer.type=huggingface"])


def _garbage_tokenizer(d, t):
    path = t / "garbage.model"
    path.write_bytes(bytes(range(256)) * 4)
    return ([f"data.tokenizer.path={path}"],
            ["data.tokenizer.path=", "garbage.model", "not a valid sentencepiece model"])


def _vocab_listing_as_model(d, t):
    listing = Path(d["tokenizer"]).with_suffix(".vocab")  # written next to tok.model
    return ([f"data.tokenizer.path={listing}"],
            ["tok.vocab is sentencepiece's vocabulary listing", "give", "tok.model"])


def _hf_without_eod(d, t):
    path = _hf_tokenizer(t / "tokenizer.json", ["<pad>"])
    return ([f"data.tokenizer.path={path}", "data.tokenizer.type=huggingface"],
            ["data.tokenizer.eod_token", "cannot find an end-of-document token"])


def _hf_unknown_eod(d, t):
    path = _hf_tokenizer(t / "tokenizer.json", ["<|endoftext|>"])
    return ([f"data.tokenizer.path={path}", "data.tokenizer.type=huggingface",
             "data.tokenizer.eod_token=<|im_end|>"],
            ["data.tokenizer.eod_token='<|im_end|>'", "not in the vocabulary"])


def _mid_corpus_ids(d, t):
    """Bad ids in every sequence the start-up sample does not read: the per-sample check of the
    data path finds them in the first batch."""
    from megatron_tst.data.checks import DataSource, _sample_indices, read_index

    p = _copy(d["train"], t / "mid")
    files = read_index(DataSource(str(p), "k"))
    tokens = np.fromfile(str(p) + ".bin", dtype=np.uint16)
    sampled = set(_sample_indices(files.num_sequences))
    for i in range(files.num_sequences):
        if i not in sampled:
            tokens[files.pointer(i) // 2] = 200
    tokens.tofile(str(p) + ".bin")
    return ([f"data.train_paths=[{p}]", "data.num_workers=1"],
            ["token id 200 in training sample", "mid", "outside the vocabulary",
             "another tokenizer"])


def _vocab_smaller_than_tokenizer(d, t):
    return (["model.vocab_size=50"],
            ["model.vocab_size=50", "smaller than the tokenizer's vocabulary",
             "Set model.vocab_size=96"])


DATA_CASES = {
    "missing-bin": _missing_bin,
    "missing-idx": _missing_idx,
    "prefix-with-suffix": _prefix_with_suffix,
    "truncated-bin": _truncated_bin,
    "idx-of-another-dataset": _other_index,
    "bin-bigger-than-idx": _other_index_bigger_bin,
    "dtype-mismatch": _dtype_mismatch,
    "not-an-indexed-dataset": _not_indexed,
    "truncated-idx": _truncated_idx,
    "no-documents": _empty_dataset,
    "ids-from-a-bigger-tokenizer": _ids_from_bigger_tokenizer,
    "dtype-cannot-hold-vocab": _dtype_too_small,
    "empty-valid-split": _empty_valid_split,
    "valid-shorter-than-a-sample": _valid_too_short,
    "seq-length-longer-than-data": _seq_length_too_long,
    "tst-seq-length-longer-than-data": _tst_seq_length_too_long,
    "unweighted-blend-too-small": _unweighted_blend,
    "absurd-step-count": _absurd_steps,
    "missing-tokenizer": _missing_tokenizer,
    "sentencepiece-as-huggingface": _sentencepiece_as_hf,
    "huggingface-as-sentencepiece": _hf_as_sentencepiece,
    "hf-directory-as-sentencepiece": _hf_directory_as_sentencepiece,
    "garbage-tokenizer": _garbage_tokenizer,
    "vocab-listing-as-model": _vocab_listing_as_model,
    "hf-without-eod": _hf_without_eod,
    "hf-unknown-eod-token": _hf_unknown_eod,
}
# Found once the run is being built (megatron-core imported, process group up): the last line
# of stderr is the error.
AFTER_START_CASES = {
    "bad-ids-mid-corpus": _mid_corpus_ids,
    "vocab-size-smaller-than-tokenizer": _vocab_smaller_than_tokenizer,
}
# Recipe cases again, through the real CLI: same message as in-process.
CLI_RECIPE_CASES = ["yaml-syntax", "unknown-nested-key", "world-size-mismatch", "missing-base"]

_ALL = {**DATA_CASES, **AFTER_START_CASES}


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory, synthetic_data):
    """Start every selected subprocess case at once (they spend their time importing); each
    test waits for its own."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")
                and item.originalname in ("test_bad_data", "test_bad_recipe_real_cli")}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, max(2, os.cpu_count() or 2)))
    runs = {}
    for case in sorted(selected):
        tmp = tmp_path_factory.mktemp(case)
        if case in _ALL:
            overrides, expected = _ALL[case](synthetic_data, tmp)
            args = ["train", str(write_tiny_recipe(tmp, synthetic_data)), *overrides]
            env = {}
        else:
            spec, overrides, expected, env = RECIPE_CASES[case]
            args = ["train", str(_recipe_case(tmp, spec)), *overrides]
            expected = [p.replace("{tmp}", str(tmp)) for p in expected]
        runs[case] = (pool.submit(run_cli, args, env=env, check=False), expected, args)
    yield runs
    pool.shutdown(wait=True)


@pytest.mark.parametrize("case", list(_ALL))
def test_bad_data(case, cli_runs):
    future, expected, _ = cli_runs[case]
    result = future.result()
    assert_one_paragraph(result.returncode, result.stderr, expected,
                         after_start=case in AFTER_START_CASES)


@pytest.mark.parametrize("case", CLI_RECIPE_CASES)
def test_bad_recipe_real_cli(case, cli_runs, capsys, monkeypatch):
    future, expected, args = cli_runs[case]
    result = future.result()
    error = assert_one_paragraph(result.returncode, result.stderr, expected)
    # The same recipe in-process gives the same message.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in RECIPE_CASES[case][3].items():
        monkeypatch.setenv(key, value)
    rc, stderr = _run_in_process(capsys, args[1:])
    assert (rc, stderr.strip()) == (2, error)
