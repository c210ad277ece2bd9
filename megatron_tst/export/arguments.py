"""Command-line arguments of ``megatron-tst export``, ``import`` and ``eval`` (no heavy imports:
the CLI builds its parser before knowing the command)."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def add_export_arguments(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint step_* directory or a checkpoint root "
                                      "(e.g. runs/demo-cpu/checkpoints: its newest complete one)")
    p.add_argument("--to", dest="format", choices=["hf"], default="hf",
                   help="output format (hf: a Hugging Face transformers model directory)")
    p.add_argument("outdir", help="the directory to write (new or empty, or --force)")
    p.add_argument("--force", action="store_true", help="replace the contents of OUTDIR")
    p.add_argument("--tokenizer", default=None,
                   help="the run's tokenizer file, if it is no longer where the run had it")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype (default: the run's model.params_dtype)")
    p.add_argument("--keep-vocab-padding", action="store_true",
                   help="keep megatron's padded vocabulary rows (default: drop them)")
    p.add_argument("--check", action="store_true",
                   help="load the export with transformers and compare its logits and tokenizer "
                        "with the checkpoint's (needs memory for both models)")


def add_import_arguments(p) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR", help="a Hugging Face model directory (config.json, "
                                                     "*.safetensors, tokenizer files)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the checkpoint root to write (new or empty, or --force)")
    p.add_argument("--recipe", default=None,
                   help="the recipe that will train from it: its model keys, vocabulary and "
                        "tokenizer are checked against the model, its dtype and its TP's "
                        "vocabulary padding are used")
    p.add_argument("overrides", nargs="*", help="dotted overrides of --recipe")
    p.add_argument("--force", action="store_true", help="replace the contents of DIR")


def add_eval_arguments(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint step_* directory or a checkpoint root")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", metavar="PREFIX",
                      help="a held-out indexed dataset (path without .bin/.idx), e.g. "
                           "runs/demo-cpu/data/valid")
    what.add_argument("--text", metavar="FILE", help="a UTF-8 text file, evaluated as one document")
    p.add_argument("overrides", nargs="*",
                   help="layout overrides: parallel.* (default: the run's layout under torchrun, "
                        "TP=PP=EP=1 in one process) and training.micro_batch_size")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate only the first N tokens of the data")
    p.add_argument("--tokenizer", default=None,
                   help="the run's tokenizer file, if it is no longer where the run had it")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the figures as JSON to FILE ('-': print JSON instead of the "
                        "summary)")
