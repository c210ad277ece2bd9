from __future__ import annotations

import argparse
import json

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_tst.data.preprocess import add_preprocess_arguments, run_preprocess
from megatron_tst.data.tokenizer import SentencePieceTokenizer


def parse(argv):
    parser = argparse.ArgumentParser(prog="megatron-tst preprocess")
    add_preprocess_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def write_inputs(tmp_path, texts):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:60]), encoding="utf-8")
    txt = tmp_path / "b.txt"
    txt.write_text("\n\n".join(texts[60:]), encoding="utf-8")
    return jsonl, txt


def test_cli_with_sentencepiece_model(tmp_path, texts, sp_model, capsys):
    jsonl, txt = write_inputs(tmp_path, texts)
    prefix = tmp_path / "data" / "corpus"
    args = parse(["--input", jsonl, txt, "--output-prefix", prefix, "--tokenizer-model", sp_model,
                  "--workers", "2"])
    assert run_preprocess(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert f"preprocessed {len(texts)} documents" in out[0] and str(prefix) + ".bin" in out[0]
    assert len(IndexedDataset(str(prefix))) == len(texts)


def test_cli_with_hf_tokenizer(tmp_path, texts, hf_json, capsys):
    jsonl, _ = write_inputs(tmp_path, texts)
    args = parse(["--input", jsonl, "--output-prefix", tmp_path / "hf", "--hf-tokenizer", hf_json,
                  "--eod-token", "<|endoftext|>"])
    assert run_preprocess(args) == 0
    dataset = IndexedDataset(str(tmp_path / "hf"))
    assert len(dataset) == 60 and dataset[0][-1] == 0


def test_cli_trains_a_tokenizer_by_default(tmp_path, texts, capsys):
    jsonl, txt = write_inputs(tmp_path, texts)
    prefix = tmp_path / "trained"
    for argv in (["--train-tokenizer", "--vocab-size", "400"], []):
        args = parse(["--input", jsonl, txt, "--output-prefix", prefix, "--vocab-size", "400"]
                     if not argv else ["--input", jsonl, txt, "--output-prefix", prefix, *argv])
        assert run_preprocess(args) == 0
        model = tmp_path / "trained.tokenizer.model"
        tokenizer = SentencePieceTokenizer(model)
        assert tokenizer.vocab_size == 400
        dataset = IndexedDataset(str(prefix))
        assert len(dataset) == len(texts)
        assert tokenizer.detokenize(dataset[0][:-1].tolist()) == texts[0]
    assert str(model) in capsys.readouterr().out


def test_cli_errors_return_1_with_message(tmp_path, texts, sp_model, hf_json, capsys):
    jsonl, _ = write_inputs(tmp_path, texts)
    cases = [
        (["--input", tmp_path / "nope.jsonl", "--output-prefix", tmp_path / "o",
          "--tokenizer-model", sp_model], "nope.jsonl: input file not found"),
        (["--input", jsonl, "--output-prefix", tmp_path / "o", "--tokenizer-model",
          tmp_path / "missing.model"], "missing.model"),
        (["--input", jsonl, "--output-prefix", tmp_path / "o", "--tokenizer-model", sp_model,
          "--vocab-size", "100"], "--vocab-size only applies"),
        (["--input", jsonl, "--output-prefix", tmp_path / "o", "--tokenizer-model", sp_model,
          "--text-key", "body"], "no 'body' key"),
        (["--input", jsonl, "--output-prefix", tmp_path / "o", "--hf-tokenizer", hf_json,
          "--eod-token", "<nope>"], "'<nope>' is not in the vocabulary"),
    ]
    for argv, message in cases:
        assert run_preprocess(parse(argv)) == 1
        err = capsys.readouterr().err
        assert err.startswith("megatron-tst preprocess: error:") and message in err, err
    assert not list(tmp_path.glob("o.*"))
