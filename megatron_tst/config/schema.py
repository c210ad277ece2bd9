"""Typed run configuration: one dataclass per concern, strict keys, cross-field validation.

Every field is reachable from YAML (``section.key``) and from the command line as a dotted
override (``optimizer.lr=1e-3``). ``RunConfig.validate`` checks combinations that would only fail
deep inside megatron-core (heads vs hidden size, parallel sizes vs world size, ...) before any
work starts; the loader attaches the file each offending key came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_tst.config.errors import ConfigError

Precision = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    """A Llama-style decoder built by megatron-core's ``GPTModel``."""

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention; None = one KV head per head
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    seq_length: int = 128
    vocab_size: Optional[int] = None  # None = the tokenizer's; padded for TP and kernels
    make_vocab_size_divisible_by: int = 128
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["swiglu", "gelu"] = "swiglu"
    position_embedding: Literal["rope", "none"] = "rope"
    rotary_base: int = 10000
    # RoPE left out in every n-th layer (SmolLM3's NoPE layers): 4 = layers 4, 8, ... have none
    no_rope_freq: Optional[int] = None
    qk_layernorm: bool = False
    untie_embeddings: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    params_dtype: Precision = "float32"
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    # Mixture of experts (None = dense).
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_aux_loss_coeff: float = 0.0
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    moe_grouped_gemm: bool = False


@dataclass
class ParallelConfig:
    """Model-parallel sizes; the data-parallel size is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # model chunks per pipeline stage (interleaved 1F1B); None = one chunk (plain 1F1B)
    virtual_pipeline_model_parallel_size: Optional[int] = None
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1  # only 1: context parallelism is not supported (see validate)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, gloo without


@dataclass
class TokenizerConfig:
    type: Literal["sentencepiece", "huggingface"] = "sentencepiece"
    path: Optional[str] = None  # .model (sentencepiece) or tokenizer.json (huggingface)
    eod_token: Optional[str] = None  # huggingface: the end-of-document token, if not a usual name


@dataclass
class DataConfig:
    """Where samples come from: the bundled demo corpus or megatron indexed datasets."""

    source: Literal["demo", "indexed"] = "indexed"
    # Indexed dataset prefixes (path without .bin/.idx). Several prefixes are blended; weights
    # are optional and given in the same order.
    train_paths: list[str] = field(default_factory=list)
    train_weights: Optional[list[float]] = None
    valid_paths: list[str] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    demo_vocab_size: int = 4096  # tokenizer trained on the demo corpus when source=demo
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class TrainingConfig:
    train_steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8  # samples per optimizer step, over all data-parallel ranks
    eval_interval: int = 50  # 0 = never
    eval_steps: int = 4  # validation batches per evaluation
    log_interval: int = 10
    # Stop (after saving a checkpoint) once this step is done, although the LR schedule runs to
    # train_steps: for time-boxed jobs and resume tests. None = run to train_steps.
    exit_at_step: Optional[int] = None
    # Signals that make every rank finish the step, save a checkpoint and exit with status 75
    # (Slurm: SIGTERM on preemption/requeue, SIGUSR1 from --signal=B:USR1@T before the limit).
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Save and exit (status 75) before this many minutes since start: stops once the time left
    # is less than the longest step plus the last save took. None = no limit.
    time_limit_minutes: Optional[float] = None
    # A non-finite loss or gradient: skip the update (counted) or stop after saving (status 3).
    nonfinite: Literal["stop", "skip"] = "stop"
    loss_spike_sigma: float = 6.0  # flag losses this many robust sigmas above recent; 0 = off


@dataclass
class OptimizerConfig:
    """AdamW through megatron-core's ``get_megatron_optimizer``."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 = no clipping


@dataclass
class ScheduleConfig:
    """Warmup-stable-decay over the whole run (both TST phases share one schedule)."""

    warmup_steps: int = 10
    decay_fraction: float = 0.1  # fraction of train_steps spent decaying, at the end
    decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    final_lr: float = 0.0


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None = <run_dir>/checkpoints
    save_interval: int = 0  # steps; 0 = only at the end
    save_final: bool = True
    keep_last: int = 2  # 0 = keep all
    load: str = "auto"  # auto: latest in dir if any | none | a checkpoint directory
    load_optimizer: bool = True  # false: fresh Adam moments (model, step, data, LR continue)
    # Recipe changes accepted on resume (keys or sections, e.g. [training.train_steps, schedule]);
    # see docs/checkpoints.md for what may change freely and what never can.
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline unless WANDB_API_KEY is set
    wandb_project: str = "megatron-tst"
    tensorboard: bool = False
    log_memory: bool = False


@dataclass
class TSTConfig:
    """Token-Superposition Training (see docs/method.md). ``bag_size: 1`` or a zero-length
    superposition phase is exactly standard training."""

    bag_size: int = 1  # s: tokens superposed per latent position in the superposition phase
    ratio: Optional[float] = None  # r: fraction of training.train_steps in the superposition phase
    superposition_steps: Optional[int] = None  # or the count directly (exclusive with ratio)
    weighting: Literal["uniform", "power_law", "explicit"] = "uniform"
    power: float = 1.0  # power_law: slot k (1-based) weighs 1/k**power
    slot_weights: Optional[list[float]] = None  # explicit: one weight per slot (normalised)
    respect_documents: bool = False  # bags and next-bag targets never cross an EOD token
    reset_optimizer_at_switch: bool = False  # ablation: fresh Adam moments in the recovery phase
    reinit_embeddings_at_switch: bool = False  # ablation: re-initialise embedding and LM head

    def num_superposition_steps(self, train_steps: int) -> int:
        if self.bag_size == 1:
            return 0
        if self.superposition_steps is not None:
            return self.superposition_steps
        return round((self.ratio or 0.0) * train_steps)


@dataclass
class LossConfig:
    """How the LM loss is computed, in both phases (see docs/loss.md, docs/performance.md)."""

    # auto: triton with CUDA and Triton importable, else fused. reference: materialised logits,
    # s cross-entropies (TP=1, checks). fused: materialised logits, one vocab-parallel pass.
    # chunked / triton: LM head fused into the loss, logits never materialised.
    implementation: Literal["auto", "reference", "fused", "chunked", "triton"] = "auto"


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/${name}"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tst: TSTConfig = field(default_factory=TSTConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    # ---------------------------------------------------------------- derived values
    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir.replace("${name}", self.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.resolved_run_dir}/checkpoints"

    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validation
    def validate(self, world_size: Optional[int] = None) -> None:
        """Raise ``ConfigError`` for impossible combinations; ``world_size`` adds layout checks."""
        m, p, t = self.model, self.parallel, self.training

        def fail(key: str, msg: str) -> None:
            raise ConfigError(msg, key=key, value=_get(self, key))

        for key in (
            "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.seq_length",
            "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
            "parallel.expert_model_parallel_size", "training.train_steps",
            "training.micro_batch_size", "training.global_batch_size", "training.eval_steps",
            "training.log_interval", "model.make_vocab_size_divisible_by",
        ):
            if _get(self, key) < 1:
                fail(key, "must be a positive integer")
        for key in ("training.eval_interval", "checkpoint.save_interval", "checkpoint.keep_last",
                    "schedule.warmup_steps", "data.num_workers"):
            if _get(self, key) < 0:
                fail(key, "must be >= 0")
        for key in ("model.ffn_hidden_size", "model.kv_channels", "model.moe_ffn_hidden_size"):
            if _get(self, key) is not None and _get(self, key) < 1:
                fail(key, "must be a positive integer (or null for the default)")
        for key in ("model.rotary_base", "model.norm_epsilon", "model.init_method_std",
                    "optimizer.adam_eps"):
            if _get(self, key) <= 0:
                fail(key, "must be positive")
        for key in ("model.hidden_dropout", "model.attention_dropout", "optimizer.adam_beta1",
                    "optimizer.adam_beta2"):
            if not 0 <= _get(self, key) < 1:
                fail(key, "must be in [0, 1)")
        for key in ("optimizer.weight_decay", "optimizer.clip_grad", "model.moe_aux_loss_coeff"):
            if _get(self, key) < 0:
                fail(key, "must be >= 0")
        if t.train_steps > 10**9:
            fail("training.train_steps", "is absurd (more than 10^9 optimizer steps)")
        if self.data.source == "demo" and self.data.demo_vocab_size < 300:
            fail("data.demo_vocab_size", "must be >= 300 (the tokenizer needs its byte and "
                                         "special pieces)")
        if m.num_moe_experts is not None and m.num_moe_experts < 1:
            fail("model.num_moe_experts", "must be a positive integer (or null for a dense model)")
        if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
            fail("model.num_attention_heads",
                 f"must divide model.hidden_size={m.hidden_size} (or set model.kv_channels)")
        if m.num_query_groups is not None and (
            m.num_query_groups < 1 or m.num_attention_heads % m.num_query_groups
        ):
            fail("model.num_query_groups",
                 f"must divide model.num_attention_heads={m.num_attention_heads}")
        tp = p.tensor_model_parallel_size
        if m.num_attention_heads % tp:
            fail("parallel.tensor_model_parallel_size",
                 f"must divide model.num_attention_heads={m.num_attention_heads}")
        if (m.num_query_groups or m.num_attention_heads) % tp:
            fail("parallel.tensor_model_parallel_size",
                 f"must divide model.num_query_groups={m.num_query_groups}")
        if m.num_layers % p.pipeline_model_parallel_size:
            fail("parallel.pipeline_model_parallel_size",
                 f"must divide model.num_layers={m.num_layers}")
        vp = p.virtual_pipeline_model_parallel_size
        if vp is not None:
            if p.pipeline_model_parallel_size < 2 or vp < 2:
                fail("parallel.virtual_pipeline_model_parallel_size",
                     "needs parallel.pipeline_model_parallel_size > 1 and a value > 1 (or null)")
            if m.num_layers % (p.pipeline_model_parallel_size * vp):
                fail("parallel.virtual_pipeline_model_parallel_size",
                     f"pipeline x virtual stages must divide model.num_layers={m.num_layers}")
        if p.context_parallel_size != 1:
            fail("parallel.context_parallel_size",
                 "context parallelism is not supported: TST folds labels into (B, L, s) bags "
                 "before any sequence sharding, and megatron-tst does not shard the sequence "
                 "across CP ranks yet; use tensor_model_parallel_size with sequence_parallel "
                 "for long sequences, and set parallel.context_parallel_size=1")
        if p.sequence_parallel and tp == 1:
            fail("parallel.sequence_parallel", "needs parallel.tensor_model_parallel_size > 1")
        if m.num_moe_experts is None:
            if p.expert_model_parallel_size != 1:
                fail("parallel.expert_model_parallel_size", "needs model.num_moe_experts to be set")
        else:
            if m.num_moe_experts % p.expert_model_parallel_size:
                fail("parallel.expert_model_parallel_size",
                     f"must divide model.num_moe_experts={m.num_moe_experts}")
            if tp > 1 and not p.sequence_parallel:
                fail("parallel.sequence_parallel", "megatron-core requires sequence parallelism "
                     "for MoE with tensor parallelism: set parallel.sequence_parallel=true")
            if not 1 <= m.moe_router_topk <= m.num_moe_experts:
                fail("model.moe_router_topk", f"must be in [1, model.num_moe_experts={m.num_moe_experts}]")
        if m.no_rope_freq is not None and (
                m.no_rope_freq < 1 or m.num_layers % m.no_rope_freq or m.position_embedding != "rope"):
            fail("model.no_rope_freq", f"must divide model.num_layers={m.num_layers} and needs "
                                       "model.position_embedding=rope (or null)")
        if m.vocab_size is not None and m.vocab_size < 1:
            fail("model.vocab_size", "must be positive (or null to take the tokenizer's)")
        if not 0.0 <= self.schedule.decay_fraction <= 1.0:
            fail("schedule.decay_fraction", "must be in [0, 1]")
        if self.optimizer.lr <= 0:
            fail("optimizer.lr", "must be positive")
        if not 0 <= self.schedule.final_lr <= self.optimizer.lr:
            fail("schedule.final_lr", f"must be in [0, optimizer.lr={self.optimizer.lr}]")
        decay = round(self.schedule.decay_fraction * t.train_steps)
        if self.schedule.warmup_steps >= t.train_steps or self.schedule.warmup_steps + decay > t.train_steps:
            fail("schedule.warmup_steps",
                 f"warmup plus decay ({decay} steps) exceeds training.train_steps={t.train_steps}")
        if self.data.source == "indexed":
            if not self.data.train_paths:
                fail("data.train_paths", "is empty: give indexed dataset prefixes or set data.source=demo")
            if self.data.tokenizer.path is None:
                fail("data.tokenizer.path", "is required when data.source=indexed")
        w = self.data.train_weights
        if w is not None and (len(w) != len(self.data.train_paths) or min(w) <= 0):
            fail("data.train_weights", "needs one positive weight per entry of data.train_paths")
        self._validate_tst()
        if t.exit_at_step is not None and not 1 <= t.exit_at_step <= t.train_steps:
            fail("training.exit_at_step", f"must be in [1, training.train_steps={t.train_steps}]")
        from megatron_tst.training.signals import signal_number

        if t.time_limit_minutes is not None and t.time_limit_minutes <= 0:
            fail("training.time_limit_minutes", "must be positive (or null for no limit)")
        if t.loss_spike_sigma < 0:
            fail("training.loss_spike_sigma", "must be >= 0 (0 turns the detector off)")

        for name in t.exit_signals:
            try:
                signal_number(name)
            except ValueError as err:
                fail("training.exit_signals", str(err))
        for name in self.checkpoint.allow_changes:
            if not _is_key_or_section(self, name):
                fail("checkpoint.allow_changes", f"{name!r} is not a recipe key or section")
        lo = self.checkpoint.load
        if lo not in ("auto", "none") and not lo:
            fail("checkpoint.load", "must be 'auto', 'none' or a checkpoint directory")
        if world_size is not None:
            self.validate_layout(world_size)

    def _validate_tst(self) -> None:
        x, steps = self.tst, self.training.train_steps

        def fail(key: str, msg: str) -> None:
            raise ConfigError(msg, key=key, value=_get(self, key))

        if x.bag_size < 1:
            fail("tst.bag_size", "must be >= 1 (1 = standard training)")
        if x.ratio is not None and x.superposition_steps is not None:
            fail("tst.superposition_steps", "give tst.ratio or tst.superposition_steps, not both")
        if x.ratio is not None and not 0.0 <= x.ratio <= 1.0:
            fail("tst.ratio", "must be in [0, 1] (the paper recommends 0.2-0.4)")
        if x.superposition_steps is not None and not 0 <= x.superposition_steps <= steps:
            fail("tst.superposition_steps", f"must be in [0, training.train_steps={steps}]")
        if x.bag_size > 1 and x.ratio is None and x.superposition_steps is None:
            fail("tst.bag_size", "needs tst.ratio (or tst.superposition_steps) to say how long "
                                 "the superposition phase lasts")
        if x.weighting == "explicit":
            if x.slot_weights is None or len(x.slot_weights) != x.bag_size:
                fail("tst.slot_weights", f"needs one weight per slot (tst.bag_size={x.bag_size})")
            if min(x.slot_weights) < 0 or sum(x.slot_weights) <= 0:
                fail("tst.slot_weights", "must be non-negative with a positive sum")
        elif x.slot_weights is not None:
            fail("tst.slot_weights", "is only used with tst.weighting=explicit")
        if x.weighting == "power_law" and x.power < 0:
            fail("tst.power", "must be >= 0")
        if self.loss.implementation == "reference" and self.parallel.tensor_model_parallel_size > 1:
            fail("loss.implementation", "the reference loss needs full-vocabulary logits (TP=1); "
                                        "use fused, chunked or triton")

    def validate_layout(self, world_size: int) -> None:
        p, t = self.parallel, self.training
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"the world size {world_size} is not divisible by tensor x pipeline parallel size "
                f"{model_parallel}: launch a multiple of {model_parallel} processes",
                key="parallel.tensor_model_parallel_size", value=p.tensor_model_parallel_size)
        dp = world_size // model_parallel
        if dp % p.expert_model_parallel_size:
            raise ConfigError(
                f"must divide the data-parallel size {dp} (world size {world_size})",
                key="parallel.expert_model_parallel_size", value=p.expert_model_parallel_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"must be a multiple of training.micro_batch_size x data-parallel size = "
                f"{t.micro_batch_size} x {dp}",
                key="training.global_batch_size", value=t.global_batch_size)
        microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        if p.virtual_pipeline_model_parallel_size and microbatches % p.pipeline_model_parallel_size:
            raise ConfigError(
                f"gives {microbatches} micro-batches per step; the interleaved schedule needs a "
                f"multiple of parallel.pipeline_model_parallel_size="
                f"{p.pipeline_model_parallel_size}",
                key="training.global_batch_size", value=t.global_batch_size)


def _is_key_or_section(cfg: object, dotted: str) -> bool:
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cfg) or part not in {f.name for f in dataclasses.fields(cfg)}:
            return False
        cfg = getattr(cfg, part)
    return True


def _get(cfg: object, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
