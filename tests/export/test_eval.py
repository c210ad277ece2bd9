"""``megatron-tst eval``: figures checked against transformers' forward of the export; bad input
to ``export`` and ``eval`` ends as one paragraph with exit status 2."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from megatron_tst import cli
from megatron_tst.config import RunConfig
from megatron_tst.evaluate import evaluate_checkpoint
from megatron_tst.export.errors import ExportError
from megatron_tst.export.hf import choose_architecture, export_checkpoint
from tests.conftest import run_cli

TEXT = ("the cat sat on a mat while the dog ran far away.\nand then it slept under an old tree "
        "near the river bank until morning came; the dog ran far away and the cat slept\n") * 3


def test_eval_cli_prints_and_writes_figures(dense_run, synthetic_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(dense_run), "--data", synthetic_data["valid"],
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in ("loss", "perplexity", "bits per byte", "tokens", "bytes"):
        assert line in printed
    r = json.loads(out.read_text())
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    valid = IndexedDataset(synthetic_data["valid"])
    assert r["tokens"] == int(valid.sequence_lengths.sum())  # all of it, each token once
    assert r["step"] == 3 and r["phase"] == "recovery" and r["layout"]["tp"] == 1
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / r["bytes"])
    assert 0 < r["loss"] < math.log(128)


def test_eval_of_text_equals_transformers_loss_of_the_export(dense_run, synthetic_data,
                                                             tmp_path):
    """In-process: the loss over the text's windows (the stream starts with an end-of-document
    token) equals the cross-entropy transformers computes with the exported model (padding rows
    kept, so the softmax is the same); the bytes are the file's."""
    import sentencepiece as spm
    import transformers

    text = tmp_path / "held-out.txt"
    text.write_text(TEXT)
    r = evaluate_checkpoint(dense_run, text=str(text))
    sp = spm.SentencePieceProcessor(model_file=synthetic_data["tokenizer"])
    ids = [sp.eos_id(), *sp.encode(TEXT)]
    assert r["tokens"] == len(ids) - 1
    assert r["bytes"] == len(TEXT.encode())

    export_checkpoint(dense_run, tmp_path / "hf", keep_vocab_padding=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                           dtype=torch.float32).eval()
    L, total = r["sequence_length"], 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, L):
            window = torch.tensor([ids[start:start + L + 1]])
            logits = hf(input_ids=window[:, :-1]).logits
            total += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:],
                                                             reduction="sum"))
    assert r["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(total / math.log(2) / r["bytes"], rel=1e-5)


def test_eval_max_tokens_and_superposition_warning(dense_run, synthetic_data):
    r = evaluate_checkpoint(dense_run / "step_0000001", data=synthetic_data["valid"],
                            max_tokens=100)
    assert r["tokens"] == 100 and r["windows"] == 4
    assert r["phase"] == "superposition" and "not a next-token model" in r["warnings"][0]
    assert "(bags of 2 tokens)" in r["warnings"][0]  # the run's s, from the train state


@pytest.mark.slow
def test_eval_under_tp2_equals_one_process(dense_run, synthetic_data, tmp_path):
    one = run_cli(["eval", str(dense_run), "--data", synthetic_data["valid"], "--json", "-"])
    two = run_cli(["eval", str(dense_run), "--data", synthetic_data["valid"], "--json", "-",
                   "parallel.tensor_model_parallel_size=2"], nproc=2)
    a, b = json.loads(one.stdout), json.loads(two.stdout[two.stdout.index("{"):])
    assert b["layout"]["tp"] == 2
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"])


# ------------------------------------------------------------------------------- bad input
def run_main(args, capsys) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-tst: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_export_refuses_what_is_not_a_checkpoint(dense_run, tmp_path, capsys):
    assert "does not exist" in run_main(["export", str(tmp_path / "nope"), str(tmp_path / "o")],
                                        capsys)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    assert "not a megatron dist checkpoint" in run_main(
        ["export", str(tmp_path / "junk"), str(tmp_path / "o")], capsys)
    assert "give " + str(dense_run) in run_main(
        ["export", str(dense_run.parent), str(tmp_path / "o")], capsys)  # the run dir
    broken = tmp_path / "broken"
    shutil.copytree(dense_run / "step_0000002", broken)
    (broken / "checkpoint.json").write_text(json.dumps({"format_version": 99}))
    err = run_main(["eval", str(broken), "--text", str(tmp_path / "junk" / "file.txt")], capsys)
    assert "checkpoint format 99" in err
    (broken / "checkpoint.json").unlink()
    assert "not a complete megatron-tst checkpoint" in run_main(
        ["export", str(broken), str(tmp_path / "o")], capsys)


def test_export_refuses_a_non_empty_outdir_without_force(dense_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = run_main(["export", str(dense_run), "--to", "hf", str(out)], capsys)
    assert "not empty" in err and "--force" in err
    assert (out / "notes.txt").read_text() == "mine"
    assert cli.main(["export", str(dense_run), "--to", "hf", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


def test_eval_refuses_bad_input(dense_run, tmp_path, capsys):
    err = run_main(["eval", str(dense_run), "--data", str(tmp_path / "missing")], capsys)
    assert "data error" in err and "missing.bin" in err
    err = run_main(["eval", str(dense_run), "--text", str(tmp_path / "t.txt"),
                    "model.num_layers=3"], capsys)
    assert "model.num_layers" in err and "only layout overrides" in err


@pytest.mark.parametrize("overrides, key", [
    ({"normalization": "LayerNorm"}, "model.normalization"),
    ({"activation": "gelu"}, "model.activation"),
    ({"num_moe_experts": 4, "no_rope_freq": 2}, "model.no_rope_freq"),
    ({"no_rope_freq": 2, "qk_layernorm": True}, "model.qk_layernorm"),
])
def test_unsupported_architectures_are_refused_naming_the_key(overrides, key):
    cfg = RunConfig()
    for name, value in overrides.items():
        setattr(cfg.model, name, value)
    with pytest.raises(ExportError) as err:
        choose_architecture(cfg)
    assert err.value.key == key


@pytest.mark.parametrize("overrides, arch", [
    ({}, "LlamaForCausalLM"),
    ({"qk_layernorm": True}, "Qwen3ForCausalLM"),
    ({"num_moe_experts": 8, "qk_layernorm": True}, "Qwen3MoeForCausalLM"),
    ({"num_moe_experts": 8}, "MixtralForCausalLM"),
    ({"no_rope_freq": 2}, "SmolLM3ForCausalLM"),
])
def test_architecture_choice(overrides, arch):
    cfg = RunConfig()
    for name, value in overrides.items():
        setattr(cfg.model, name, value)
    assert choose_architecture(cfg).hf_class == arch


def test_nope_layers_follow_smollm3():
    from megatron_tst.export.hf import nope_layers

    cfg = RunConfig()
    cfg.model.num_layers, cfg.model.no_rope_freq = 8, 4
    assert nope_layers(cfg) == [1, 1, 1, 0, 1, 1, 1, 0]
    np.testing.assert_array_equal(nope_layers(cfg), [int((i + 1) % 4 != 0) for i in range(8)])


def test_eval_and_export_refuse_another_tokenizer(dense_run, synthetic_data, tmp_path, capsys):
    """A tokenizer of another size than the run's (e.g. a run directory whose data was rebuilt)
    would decode the ids to other tokens: refused in one line, nothing exported."""
    import sentencepiece as spm

    words = [f"w{i} x{i % 7} y{i % 13}" for i in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_prefix=str(tmp_path / "other"),
                                   vocab_size=128, model_type="bpe", minloglevel=2)
    other = str(tmp_path / "other.model")
    err = run_main(["eval", str(dense_run), "--data", synthetic_data["valid"], "--tokenizer",
                    other], capsys)
    assert "has 128 entries" in err and "used one of 96" in err and "--tokenizer" in err
    err = run_main(["export", str(dense_run), "--to", "hf", str(tmp_path / "hf"), "--tokenizer",
                    other], capsys)
    assert "has 128 entries" in err and not (tmp_path / "hf").exists()
