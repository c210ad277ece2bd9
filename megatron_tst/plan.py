"""RunPlan: every decision derived from a recipe, made once at start-up and passed down.

The recipe (``RunConfig``) says what the user asked for; the plan says what the run does: the
phase schedule, the data stream's shape (``data/stream.py``), the layout on a world size, the
padded vocabulary (once the tokenizer is known), the slot weights and the transformer and loss
implementations resolved for this machine. ``cli train`` builds it once; data/, models/, the
trainer, the resume checks, ``inspect``, ``eval`` and ``export`` take it (or the part they need)
instead of re-deriving any of it.

Names, one per concept: ``bag_size`` (s, tokens per model position in a phase), ``data_chunk``
(the data stream's chunk, in sequence lengths: s in a TST run, else 1), ``consumed_tokens`` (the
position in the stream), ``vocab_size`` (the model's vocabulary before padding) and
``padded_vocab_size`` (the embedding's rows).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.data.stream import DataStream
from megatron_tst.tst.schedule import PhaseSchedule


def schedule_for(cfg: RunConfig) -> PhaseSchedule:
    """The phase schedule a recipe asks for."""
    t = cfg.training.train_steps
    return PhaseSchedule(t, cfg.tst.bag_size, cfg.tst.num_superposition_steps(t))


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """TE is used only where it imports and a CUDA device is present."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE
    except Exception:  # a broken TE install must not take the run down
        return False
    return bool(HAVE_TE)


def resolve_transformer_impl(cfg: RunConfig) -> str:
    """``model.transformer_impl`` for this machine: transformer_engine where it works, else
    megatron-core's local spec; an explicit transformer_engine without it is refused."""
    impl = cfg.model.transformer_impl
    if impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if impl == "transformer_engine" and not transformer_engine_available():
        raise ConfigError("transformer-engine is not importable (or no CUDA device): install the "
                          "'gpu' extra inside the NGC image, or set model.transformer_impl=local",
                          key="model.transformer_impl", value=impl)
    return impl


def resolve_fusions(cfg: RunConfig, impl: str) -> dict[str, bool]:
    """``model.*_fusion`` for this machine: null = on where the transformer-engine spec runs (and
    the fused kernel is installed), off elsewhere. GPU-only settings (FP8, a fusion set to true)
    on a machine without CUDA and transformer-engine are refused in one line."""
    from megatron_tst.config.schema import FUSIONS

    m = cfg.model
    te = impl == "transformer_engine"
    if not te and (gpu_only := m.gpu_only_settings()):
        key, value = next(iter(gpu_only.items()))
        where = ("this machine has no CUDA device" if not _cuda() else
                 "transformer-engine is not importable" if cfg.model.transformer_impl != "local"
                 else "model.transformer_impl=local")
        from megatron_tst.config.loader import config_source

        raise ConfigError(f"needs a CUDA GPU with the transformer-engine spec ({where}): "
                          f"{_cpu_fix(key, value)} to run here", key=f"model.{key}", value=value,
                          source=config_source(cfg, f"model.{key}"))
    out = {}
    for key in FUSIONS:
        value = getattr(m, key)
        out[key] = bool(value) if value is not None else te and _fusion_available(cfg, key)
    return out


def _cpu_fix(key: str, value) -> str:
    """How to run GPU-only setting ``key=value`` without transformer-engine."""
    if key == "recompute_modules":
        return f"leave {', '.join(value)} out of model.recompute_modules"
    return f"set model.{key}={'null' if key == 'fp8' else 'null or false'}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fusion_available(cfg: RunConfig, key: str) -> bool:
    """Whether the auto (null) value of fusion ``key`` turns on with the TE spec on this GPU."""
    if key == "moe_permute_fusion":
        if not cfg.model.num_moe_experts:
            return False
        from megatron.core.transformer.moe import moe_utils

        return getattr(moe_utils, "fused_permute", None) is not None
    if key == "gradient_accumulation_fusion":
        from megatron.core.tensor_parallel import layers

        return bool(getattr(layers, "_grad_accum_fusion_available", False))
    if key == "apply_rope_fusion":
        return cfg.model.position_embedding == "rope"
    return True


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: pad so every TP shard of the embedding has the same, aligned width."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """The parallel layout on ``world_size`` processes (checked by ``validate_layout``)."""

    world_size: int
    tp: int
    pp: int
    vp: Optional[int]  # model chunks per pipeline stage (interleaved 1F1B); None = one
    ep: int
    dp: int
    micro_batch_size: int
    global_batch_size: int

    def batch_layout(self, dp_rank: int):
        """Which samples data-parallel rank ``dp_rank`` reads (``data/datasets.py``)."""
        from megatron_tst.data.datasets import BatchLayout

        return BatchLayout(self.global_batch_size, self.micro_batch_size, dp_rank, self.dp)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step on each data-parallel rank."""
        return self.batch_layout(0).num_microbatches


@dataclass(frozen=True)
class RunPlan:
    cfg: RunConfig = dataclasses.field(repr=False, compare=False)
    schedule: PhaseSchedule
    stream: DataStream
    layout: Optional[Layout]  # None when built without a world size (schedule-only users)
    vocab_size: Optional[int] = None  # None until the tokenizer (or the recipe) says
    padded_vocab_size: Optional[int] = None

    @classmethod
    def build(cls, cfg: RunConfig, world_size: Optional[int] = None,
              vocab_size: Optional[int] = None) -> "RunPlan":
        """The plan for ``cfg`` on ``world_size`` processes; ``vocab_size`` (the tokenizer's, or
        the checkpoint's) can also be given later with ``with_vocab``."""
        t, p = cfg.training, cfg.parallel
        schedule = schedule_for(cfg)
        layout = None
        if world_size is not None:
            cfg.validate_layout(world_size)
            layout = Layout(world_size, p.tensor_model_parallel_size,
                            p.pipeline_model_parallel_size,
                            p.virtual_pipeline_model_parallel_size,
                            p.expert_model_parallel_size, cfg.data_parallel_size(world_size),
                            t.micro_batch_size, t.global_batch_size)
        stream = DataStream.for_schedule(schedule, cfg.model.seq_length, t.global_batch_size,
                                         t.eval_steps)
        plan = cls(cfg, schedule, stream, layout)
        return plan if vocab_size is None else plan.with_vocab(vocab_size)

    def with_vocab(self, tokenizer_vocab: int, tokenizer_name: str = "the tokenizer", *,
                   padded: Optional[int] = None) -> "RunPlan":
        """The plan with the vocabulary: ``model.vocab_size`` (or the tokenizer's when null),
        padded by megatron's rule (or ``padded``: a saved model's embedding rows, which depend on
        the TP size that trained it). A recipe vocabulary smaller than the tokenizer's is
        refused."""
        m = self.cfg.model
        vocab = m.vocab_size or tokenizer_vocab
        if vocab < tokenizer_vocab:
            raise ConfigError(
                f"is smaller than the tokenizer's vocabulary ({tokenizer_vocab:,} entries, "
                f"{tokenizer_name}): token ids would fall outside the embedding. Set "
                f"model.vocab_size={tokenizer_vocab} or null (the tokenizer's)",
                key="model.vocab_size", value=vocab)
        if padded is None:
            padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by,
                                       self.cfg.parallel.tensor_model_parallel_size)
        return dataclasses.replace(self, vocab_size=vocab, padded_vocab_size=padded)

    # ------------------------------------------------- resolved for this machine, when asked
    @functools.cached_property
    def transformer_impl(self) -> str:
        """``model.transformer_impl`` resolved for this machine."""
        return resolve_transformer_impl(self.cfg)

    @functools.cached_property
    def fusions(self) -> dict[str, bool]:
        """The ``TransformerConfig`` fusion flags resolved for this machine (``resolve_fusions``:
        refuses GPU-only settings here without CUDA and transformer-engine)."""
        return resolve_fusions(self.cfg, self.transformer_impl)

    @functools.cached_property
    def loss_impl(self) -> str:
        """``loss.implementation`` resolved for this machine (``tst/implementations.py``)."""
        from megatron_tst.tst.implementations import resolve_loss_impl

        return resolve_loss_impl(self.cfg.loss.implementation)

    @property
    def bag_model(self) -> bool:
        """Whether the model is ``TSTGPTModel`` (bags in, the loss fused into the LM head) or
        megatron's own ``GPTModel`` (a run without a superposition phase and with a loss on
        materialised logits: the baseline runs stock megatron-core code)."""
        from megatron_tst.tst.implementations import LINEAR_IMPLEMENTATIONS

        return self.schedule.is_tst or self.loss_impl in LINEAR_IMPLEMENTATIONS

    @functools.cached_property
    def slot_weights(self):
        """The MCE's per-slot weights c_k, a float32 tensor of length s (``tst/loss.py``)."""
        from megatron_tst.tst.loss import slot_weights

        x = self.cfg.tst
        return slot_weights(x.bag_size, x.weighting, x.power, x.slot_weights)
