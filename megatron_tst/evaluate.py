"""``megatron-tst eval CHECKPOINT``: next-token loss, perplexity and bits per byte on held-out data.

The data is a megatron indexed dataset (``--data PREFIX``: its documents in order, each ending
with the end-of-document token as ``megatron-tst preprocess`` writes them) or a UTF-8 text file
(``--text FILE``: one document). The tokens are one stream that starts with an end-of-document
token (as every document but the first starts in training), cut into consecutive windows of
``model.seq_length`` positions: window k reads stream positions ``[kL, kL+L)`` and predicts
``[kL+1, kL+L+1)``, so every token of the data is predicted exactly once (the last window is
padded and masked). Figures:

- loss: mean next-token cross-entropy in nats over the data's tokens (end-of-document tokens
  included, as in the trainer's validation loss);
- perplexity: exp(loss);
- bits per byte: total cross-entropy / ln 2 / UTF-8 bytes of the data's text: the file's bytes
  for ``--text``; for ``--data`` (or a cut ``--max-tokens``) the bytes of each document decoded,
  end-of-document tokens excluded, which is exact for lossless tokenizers (sentencepiece with
  byte fallback as ``megatron-tst`` trains them, byte-level BPE).

It runs in any layout: one process (TP=PP=EP=1, the default there) or under ``torchrun`` with the
run's parallel sizes or ``parallel.*`` overrides. The model is built by the trainer's own
``build_model_chunks``, its weights are loaded from the dist checkpoint (which reshards), and
the batches go through the trainer's forward step (``training/step.py``) and megatron's pipeline
schedule in forward-only mode, reduced with the trainer's ``reduce_loss``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from megatron_tst.config import ConfigError
from megatron_tst.data.errors import DataError
from megatron_tst.export.source import (build_models, checkpoint_config, find_tokenizer,
                                        load_model_weights, megatron_state, open_run_tokenizer,
                                        vocab_sizes)
from megatron_tst.plan import RunPlan
from megatron_tst.training.saved import open_checkpoint

#: overrides eval accepts (the model itself is the checkpoint's)
ALLOWED_OVERRIDES = ("parallel.", "training.micro_batch_size=", "model.transformer_impl=",
                     "model.moe_token_dispatcher_type=")


@dataclass
class EvalText:
    """The evaluated token stream and what it says in bytes."""

    tokens: np.ndarray  # int64: an end-of-document token, then the data's tokens
    num_bytes: int  # UTF-8 bytes of the data's text
    documents: int
    source: str


# ------------------------------------------------------------------------------------ data
def decoded_bytes(tokenizer, ids: Iterable[int]) -> int:
    """UTF-8 bytes of the text of ``ids``, end-of-document tokens left out."""
    ids = [int(i) for i in ids if int(i) != tokenizer.eod]
    return len(tokenizer.detokenize(ids).encode("utf-8")) if ids else 0


def _stream(docs: list[np.ndarray], tokenizer, source: str, key: str,
            num_bytes: Optional[int] = None) -> EvalText:
    if not docs or sum(len(d) for d in docs) < 1:
        raise DataError(f"{source} holds no tokens: nothing to evaluate", key=key, value=source)
    tokens = np.concatenate([[tokenizer.eod], *docs]).astype(np.int64)
    if num_bytes is None:
        num_bytes = sum(decoded_bytes(tokenizer, d) for d in docs)
    return EvalText(tokens, num_bytes, len(docs), source)


def read_indexed(prefix: str, tokenizer, max_tokens: Optional[int]) -> EvalText:
    """The documents of an indexed dataset, in order, up to ``max_tokens`` tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_tst.data.checks import DataSource, check_token_ids, read_index

    files = read_index(DataSource(prefix, "--data"))
    check_token_ids(files, tokenizer.vocab_size, "the run's tokenizer")
    dataset = IndexedDataset(prefix)
    docs, total = [], 0
    for i in range(len(dataset)):
        doc = np.asarray(dataset[i])
        if max_tokens is not None:
            doc = doc[:max_tokens - total]
        docs.append(doc)
        total += len(doc)
        if max_tokens is not None and total >= max_tokens:
            break
    return _stream(docs, tokenizer, f"indexed dataset {prefix}", "--data")


def read_text(path: str, tokenizer, max_tokens: Optional[int]) -> EvalText:
    """A UTF-8 text file as one document (no end-of-document token), up to ``max_tokens``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {path} not found", key="--text", value=path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err})", key="--text", value=path) from None
    ids = np.asarray(tokenizer.tokenize(text), dtype=np.int64)
    whole = max_tokens is None or len(ids) <= max_tokens
    return _stream([ids[:max_tokens]], tokenizer, f"text file {path}", "--text",
                   len(text.encode("utf-8")) if whole else None)


# --------------------------------------------------------------------------------- batches
def window_batch(tokens: np.ndarray, first: int, count: int, length: int) -> dict:
    """Windows ``first .. first+count-1`` of the stream as a micro-batch in the trainer's
    format (tokens, labels, loss_mask); positions past the end are padded and masked."""
    n = len(tokens)
    out = {"tokens": torch.zeros(count, length, dtype=torch.long),
           "labels": torch.zeros(count, length, dtype=torch.long),
           "loss_mask": torch.zeros(count, length, dtype=torch.float)}
    for row, k in enumerate(range(first, first + count)):
        start = k * length
        predicted = max(min(length, n - 1 - start), 0)
        if predicted == 0:
            continue
        out["tokens"][row, :predicted] = torch.from_numpy(tokens[start:start + predicted])
        out["labels"][row, :predicted] = torch.from_numpy(tokens[start + 1:start + 1 + predicted])
        out["loss_mask"][row, :predicted] = 1.0
    return out


# ------------------------------------------------------------------------------------ eval
def evaluate_checkpoint(target: str | Path, *, data: Optional[str] = None,
                        text: Optional[str] = None, overrides: Iterable[str] = (),
                        max_tokens: Optional[int] = None,
                        tokenizer: Optional[str] = None) -> Optional[dict]:
    """Evaluate ``target`` on ``data`` (indexed prefix) or ``text`` (file) in the layout of
    this process group; the figures on the last rank (None on the others)."""
    from megatron.core import parallel_state as ps

    from megatron_tst.training.step import PipelineRunner, make_forward_step, reduce_loss

    overrides = list(overrides)
    for item in overrides:
        if not item.startswith(ALLOWED_OVERRIDES):
            raise ConfigError(f"eval takes only layout overrides (parallel.*, "
                              f"training.micro_batch_size, model.transformer_impl, "
                              f"model.moe_token_dispatcher_type): the model is the checkpoint's",
                              key=item.partition("=")[0], value=item.partition("=")[2])
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError("must be at least 1", key="--max-tokens", value=max_tokens)
    tic = time.time()
    saved = open_checkpoint(target)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # One process: TP=PP=EP=1; under torchrun: the run's layout (both: unless overridden).
    parallel = {} if world == 1 else {k: v for k, v in saved.run_config.get("parallel", {}).items()
                                      if k not in ("use_distributed_optimizer",
                                                   "overlap_grad_reduce", "overlap_param_gather")}
    cfg = checkpoint_config(saved, parallel=parallel, overrides=overrides, world_size=world)
    location = find_tokenizer(saved, tokenizer)
    run_tokenizer = open_run_tokenizer(location)
    saved.check_tokenizer(run_tokenizer.vocab_size, str(location.path))
    vocab, padded = vocab_sizes(saved, run_tokenizer.vocab_size)
    if padded % cfg.parallel.tensor_model_parallel_size:
        raise ConfigError(f"the checkpoint's padded vocabulary ({padded:,}) does not split over "
                          f"{cfg.parallel.tensor_model_parallel_size} tensor-parallel ranks",
                          key="parallel.tensor_model_parallel_size",
                          value=cfg.parallel.tensor_model_parallel_size)
    stream = (read_indexed(data, run_tokenizer, max_tokens) if data is not None
              else read_text(text, run_tokenizer, max_tokens))
    with megatron_state(cfg) as env:
        plan = RunPlan.build(cfg, world).with_vocab(vocab, padded=padded)
        models, modules = build_models(plan)
        load_model_weights(saved.path, models)
        L, layout = cfg.model.seq_length, plan.layout.batch_layout(ps.get_data_parallel_rank())
        windows = math.ceil((len(stream.tokens) - 1) / L)
        run = PipelineRunner(modules, seq_length=L, micro_batch_size=layout.micro_batch_size,
                             num_microbatches=layout.num_microbatches)
        forward_step = make_forward_step(env.device)
        loss_dicts = []
        with torch.no_grad():  # window k is sample k: each call reads one global batch of them
            for first in range(0, windows, layout.global_batch_size):
                batches = [window_batch(stream.tokens, indices[0], len(indices), L)
                           for indices in layout.microbatch_indices(first)]
                loss_dicts += run(forward_step, run.iterators(lambda: iter(batches)),
                                  forward_only=True)
        loss = reduce_loss(loss_dicts)
        if not env.is_logging_rank:
            return None
        count = len(stream.tokens) - 1
        mean = float(loss)
        total = mean * count
        return {
            "checkpoint": str(saved.path), "step": saved.step, "phase": saved.phase,
            "data": stream.source, "documents": stream.documents, "tokens": count,
            "bytes": stream.num_bytes, "sequence_length": L, "windows": windows,
            "loss": mean, "perplexity": math.exp(mean) if mean < 700 else float("inf"),
            "bits_per_token": mean / math.log(2),
            "bits_per_byte": total / math.log(2) / stream.num_bytes if stream.num_bytes else None,
            "layout": {"tp": cfg.parallel.tensor_model_parallel_size,
                       "pp": cfg.parallel.pipeline_model_parallel_size,
                       "ep": cfg.parallel.expert_model_parallel_size, "dp": plan.layout.dp,
                       "micro_batch_size": layout.micro_batch_size},
            "vocab_size": vocab, "padded_vocab_size": padded,
            "wall_time_s": time.time() - tic,
            "warnings": [w for w in [saved.phase_warning()] if w],
        }


def format_summary(r: dict) -> str:
    bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
    lay = r["layout"]
    return "\n".join([
        f"evaluated {r['checkpoint']} (step {r['step']}, {r['phase'] or 'unknown'} phase)",
        f"  data           {r['data']} ({r['documents']:,} document(s))",
        f"  tokens         {r['tokens']:,} predicted, in {r['windows']:,} windows of "
        f"{r['sequence_length']}",
        f"  bytes          {r['bytes']:,} (UTF-8, of the data's text)",
        f"  loss           {r['loss']:.4f} nats/token",
        f"  perplexity     {r['perplexity']:.2f}",
        f"  bits per byte  {bpb}",
        f"  layout         TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']} (EP {lay['ep']}), "
        f"micro-batch {lay['micro_batch_size']}; {r['wall_time_s']:.1f} s",
    ])


def run_eval(args) -> int:
    result = evaluate_checkpoint(args.checkpoint, data=args.data, text=args.text,
                                 overrides=args.overrides, max_tokens=args.max_tokens,
                                 tokenizer=args.tokenizer)
    if result is None:
        return 0
    for warning in result["warnings"]:
        print(f"megatron-tst: warning: {warning}", file=sys.stderr)
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    print(format_summary(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"  json           {args.json}")
    return 0
