"""Typed run configuration: one dataclass per concern, strict keys, cross-field validation.

Every field is reachable from YAML (``section.key``) and from the command line as a dotted
override (``optimizer.lr=1e-3``). ``RunConfig.validate`` checks ranges and combinations that would
only fail deep inside megatron-core (heads vs hidden size, parallel sizes vs world size, ...)
before any work starts: each section's ``validate`` checks its own keys, given the sections they
are compared with. The loader attaches the file each offending key came from.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, NoReturn, Optional

from megatron_tst.config.errors import ConfigError
from megatron_tst.config.signals import signal_number

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
    # MoE routing (megatron-core's names and meanings). null load balancing: aux_loss when
    # moe_aux_loss_coeff > 0, else none. Aux-loss-free balancing: moe_router_enable_expert_bias
    # with moe_router_score_function=sigmoid (and moe_router_load_balancing_type=none).
    moe_router_load_balancing_type: Optional[Literal[
        "aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"]] = None
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_dtype: Optional[Literal["fp32", "fp64"]] = None  # null = the params' dtype
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_z_loss_coeff: Optional[float] = None
    moe_shared_expert_intermediate_size: Optional[int] = None  # null = no shared expert
    # Activation recomputation (megatron-core's): full = whole layers (recompute_method uniform |
    # block, recompute_num_layers per unit / per stage, default uniform, 1); selective = the
    # recompute_modules of every layer (default [core_attn]).
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[list[str]] = None
    # FP8 (GPU with transformer-engine only) inside the transformer layers; the embedding, the
    # LM head and the multi-hot CE stay in model.params_dtype / fp32.
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_param: bool = False  # keep the weights themselves in FP8 (saves memory)
    # Kernel fusions: null = on where the transformer-engine spec runs (CUDA), off otherwise;
    # true without CUDA and transformer-engine is refused.
    bias_activation_fusion: Optional[bool] = None
    bias_dropout_fusion: Optional[bool] = None
    masked_softmax_fusion: Optional[bool] = None
    apply_rope_fusion: Optional[bool] = None
    gradient_accumulation_fusion: Optional[bool] = None
    moe_permute_fusion: Optional[bool] = None

    def validate(self) -> None:
        _POSITIVE_INT.check(self, "model.num_layers", "model.hidden_size",
                            "model.num_attention_heads", "model.seq_length",
                            "model.make_vocab_size_divisible_by")
        _POSITIVE_INT_OR_NULL.check(self, "model.ffn_hidden_size", "model.kv_channels",
                                    "model.moe_ffn_hidden_size")
        _POSITIVE.check(self, "model.rotary_base", "model.norm_epsilon", "model.init_method_std")
        _FRACTION.check(self, "model.hidden_dropout", "model.attention_dropout")
        _NON_NEGATIVE.check(self, "model.moe_aux_loss_coeff")
        if self.num_moe_experts is not None and self.num_moe_experts < 1:
            _fail(self, "model.num_moe_experts",
                  "must be a positive integer (or null for a dense model)")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            _fail(self, "model.num_attention_heads",
                  f"must divide model.hidden_size={self.hidden_size} (or set model.kv_channels)")
        if self.num_query_groups is not None and (
            self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups
        ):
            _fail(self, "model.num_query_groups",
                  f"must divide model.num_attention_heads={self.num_attention_heads}")
        experts = self.num_moe_experts
        if experts is not None and not 1 <= self.moe_router_topk <= experts:
            _fail(self, "model.moe_router_topk", f"must be in [1, model.num_moe_experts={experts}]")
        if self.no_rope_freq is not None and (
                self.no_rope_freq < 1 or self.num_layers % self.no_rope_freq
                or self.position_embedding != "rope"):
            _fail(self, "model.no_rope_freq", f"must divide model.num_layers={self.num_layers} and "
                                              "needs model.position_embedding=rope (or null)")
        if self.vocab_size is not None and self.vocab_size < 1:
            _fail(self, "model.vocab_size", "must be positive (or null to take the tokenizer's)")
        self._validate_moe_and_recompute()

    def _validate_moe_and_recompute(self) -> None:
        _POSITIVE_INT_OR_NULL.check(self, "model.moe_shared_expert_intermediate_size",
                                    "model.recompute_num_layers")
        _POSITIVE.check(self, "model.moe_router_bias_update_rate")
        if self.moe_z_loss_coeff is not None and self.moe_z_loss_coeff < 0:
            _fail(self, "model.moe_z_loss_coeff", "must be >= 0 (or null for no z-loss)")
        if self.num_moe_experts is None:
            for key in MOE_ONLY:
                if getattr(self, key) != _DEFAULT_MODEL[key]:
                    _fail(self, f"model.{key}", "needs model.num_moe_experts (a MoE model)")
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            _fail(self, "model.moe_router_enable_expert_bias",
                  "needs model.moe_router_score_function=sigmoid (aux-loss-free balancing)")
        g = self.recompute_granularity
        if g != "full":
            for key in ("recompute_method", "recompute_num_layers"):
                if getattr(self, key) is not None:
                    _fail(self, f"model.{key}", "needs model.recompute_granularity=full")
        if g != "selective" and self.recompute_modules is not None:
            _fail(self, "model.recompute_modules", "needs model.recompute_granularity=selective")
        if g == "full" and self.recompute_method == "uniform" and self.num_layers % (
                self.recompute_num_layers or 1):
            _fail(self, "model.recompute_num_layers",
                  f"must divide model.num_layers={self.num_layers} with recompute_method=uniform")
        unknown = sorted(set(self.recompute_modules or ()) - set(RECOMPUTE_MODULES))
        if unknown:
            _fail(self, "model.recompute_modules",
                  f"unknown module {unknown[0]!r}: choose from {', '.join(RECOMPUTE_MODULES)}")
        if self.recompute_modules is not None and not self.recompute_modules:
            _fail(self, "model.recompute_modules", "is empty: name at least one module (or "
                                                   "null for [core_attn])")
        moe_modules = {"moe", "moe_act", "shared_experts"} & set(self.recompute_modules or ())
        if moe_modules and self.num_moe_experts is None:
            _fail(self, "model.recompute_modules",
                  f"{sorted(moe_modules)[0]} needs a MoE model (model.num_moe_experts)")
        if "moe_act" in (self.recompute_modules or ()) and not self.moe_grouped_gemm:
            _fail(self, "model.recompute_modules", "moe_act needs model.moe_grouped_gemm=true")
        if "shared_experts" in (self.recompute_modules or ()) and not (
                self.moe_shared_expert_intermediate_size):
            _fail(self, "model.recompute_modules",
                  "shared_experts needs model.moe_shared_expert_intermediate_size")

    def gpu_only_settings(self) -> dict[str, Any]:
        """The keys set here that need CUDA and transformer-engine (FP8, explicit fusions)."""
        out = {k: getattr(self, k) for k in FUSIONS if getattr(self, k)}
        if self.fp8 is not None:
            out["fp8"] = self.fp8
        if self.fp8_param:
            out["fp8_param"] = True
        if te_only := [x for x in self.recompute_modules or () if x in RECOMPUTE_TE_ONLY]:
            out["recompute_modules"] = te_only
        return out


# megatron-core's selective-recompute modules that this project's layer specs have (no MLA).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts")
# megatron-core recomputes these by discarding outputs (CheckpointWithoutOutput), which needs
# transformer-engine.
RECOMPUTE_TE_ONLY = ("layernorm", "moe_act")
FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
           "apply_rope_fusion", "gradient_accumulation_fusion", "moe_permute_fusion")
MOE_ONLY = ("moe_router_load_balancing_type", "moe_router_score_function",
            "moe_router_enable_expert_bias", "moe_router_dtype", "moe_router_pre_softmax",
            "moe_router_topk_scaling_factor", "moe_z_loss_coeff",
            "moe_shared_expert_intermediate_size", "moe_permute_fusion")
_DEFAULT_MODEL = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                  if f.default is not dataclasses.MISSING}


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
    # The process groups' timeout: a collective that waits longer fails on every rank that
    # waits (torch's default is 10 minutes for nccl, 30 for gloo). It must cover the longest
    # gap between two collectives: a synchronous save, an evaluation.
    timeout_minutes: float = 30.0

    def validate(self, model: ModelConfig) -> None:
        """The sizes, and the model's heads, layers and experts they split."""
        m, tp, pp = model, self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if not self.timeout_minutes > 0:
            _fail(self, "parallel.timeout_minutes", "must be positive (minutes)")
        _POSITIVE_INT.check(self, "parallel.tensor_model_parallel_size",
                            "parallel.pipeline_model_parallel_size",
                            "parallel.expert_model_parallel_size")
        if m.num_attention_heads % tp:
            _fail(self, "parallel.tensor_model_parallel_size",
                  f"must divide model.num_attention_heads={m.num_attention_heads}")
        if (m.num_query_groups or m.num_attention_heads) % tp:
            _fail(self, "parallel.tensor_model_parallel_size",
                  f"must divide model.num_query_groups={m.num_query_groups}")
        if m.num_layers % pp:
            _fail(self, "parallel.pipeline_model_parallel_size",
                  f"must divide model.num_layers={m.num_layers}")
        vp = self.virtual_pipeline_model_parallel_size
        if vp is not None:
            if pp < 2 or vp < 2:
                _fail(self, "parallel.virtual_pipeline_model_parallel_size",
                      "needs parallel.pipeline_model_parallel_size > 1 and a value > 1 (or null)")
            if m.num_layers % (pp * vp):
                _fail(self, "parallel.virtual_pipeline_model_parallel_size",
                      f"pipeline x virtual stages must divide model.num_layers={m.num_layers}")
        if self.context_parallel_size != 1:
            _fail(self, "parallel.context_parallel_size",
                  "context parallelism is not supported: TST folds labels into (B, L, s) bags "
                  "before any sequence sharding, and megatron-tst does not shard the sequence "
                  "across CP ranks yet; use tensor_model_parallel_size with sequence_parallel "
                  "for long sequences, and set parallel.context_parallel_size=1")
        if self.sequence_parallel and tp == 1:
            _fail(self, "parallel.sequence_parallel",
                  "needs parallel.tensor_model_parallel_size > 1")
        if m.num_moe_experts is None:
            if self.expert_model_parallel_size != 1:
                _fail(self, "parallel.expert_model_parallel_size",
                      "needs model.num_moe_experts to be set")
        else:
            if m.num_moe_experts % self.expert_model_parallel_size:
                _fail(self, "parallel.expert_model_parallel_size",
                      f"must divide model.num_moe_experts={m.num_moe_experts}")
            if tp > 1 and not self.sequence_parallel:
                _fail(self, "parallel.sequence_parallel", "megatron-core requires sequence "
                      "parallelism for MoE with tensor parallelism: set "
                      "parallel.sequence_parallel=true")


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

    def validate(self) -> None:
        _NON_NEGATIVE.check(self, "data.num_workers")
        if self.source == "demo" and self.demo_vocab_size < 300:
            _fail(self, "data.demo_vocab_size", "must be >= 300 (the tokenizer needs its byte and "
                                                "special pieces)")
        if self.source == "indexed":
            if not self.train_paths:
                _fail(self, "data.train_paths",
                      "is empty: give indexed dataset prefixes or set data.source=demo")
            if self.tokenizer.path is None:
                _fail(self, "data.tokenizer.path", "is required when data.source=indexed")
        w = self.train_weights
        if w is not None and (len(w) != len(self.train_paths) or min(w) <= 0):
            _fail(self, "data.train_weights",
                  "needs one positive weight per entry of data.train_paths")


@dataclass
class ProfileConfig:
    """A torch.profiler trace of steps ``start_step``..``end_step`` (1-based, inclusive), written
    under ``<run_dir>/profile/``; None = no profiling."""

    start_step: Optional[int] = None
    end_step: Optional[int] = None
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that profile


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
    # is less than the longest step, the longest evaluation and the last save took together.
    # None = no limit.
    time_limit_minutes: Optional[float] = None
    # Hang watchdog: when no step (nor evaluation batch, nor save) finishes within this many
    # minutes, every rank dumps its Python stacks to <run_dir>/hang/, writes exit_status.json
    # (failed, reason hang) and exits with status 76. None = off. It must exceed the longest
    # step, evaluation batch and save (docs/reliability.md).
    hang_timeout_minutes: Optional[float] = None
    # A non-finite loss or gradient: skip the update (counted) or stop after saving (status 3).
    nonfinite: Literal["stop", "skip"] = "stop"
    # skip: stop anyway (as nonfinite, after saving) past this many skipped steps in a row, or
    # in the whole run: a run whose every update is skipped is not training.
    max_consecutive_skips: int = 10
    max_skipped_steps: int = 100
    loss_spike_sigma: float = 6.0  # flag losses this many robust sigmas above recent; 0 = off
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self) -> None:
        _POSITIVE_INT.check(self, "training.train_steps", "training.micro_batch_size",
                            "training.global_batch_size", "training.eval_steps",
                            "training.log_interval", "training.max_consecutive_skips",
                            "training.max_skipped_steps")
        _NON_NEGATIVE.check(self, "training.eval_interval")
        if self.train_steps > 10**9:
            _fail(self, "training.train_steps", "is absurd (more than 10^9 optimizer steps)")
        if self.exit_at_step is not None and not 1 <= self.exit_at_step <= self.train_steps:
            _fail(self, "training.exit_at_step",
                  f"must be in [1, training.train_steps={self.train_steps}]")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            _fail(self, "training.time_limit_minutes", "must be positive (or null for no limit)")
        if self.hang_timeout_minutes is not None and not self.hang_timeout_minutes > 0:
            _fail(self, "training.hang_timeout_minutes", "must be positive (or null: no watchdog)")
        if self.loss_spike_sigma < 0:
            _fail(self, "training.loss_spike_sigma", "must be >= 0 (0 turns the detector off)")
        for name in self.exit_signals:
            try:
                signal_number(name)
            except ValueError as err:
                _fail(self, "training.exit_signals", str(err))
        prof = self.profile
        if (prof.start_step is None) != (prof.end_step is None):
            _fail(self, "training.profile.end_step",
                  "give training.profile.start_step and end_step together (or neither)")
        if prof.start_step is not None and not 1 <= prof.start_step <= prof.end_step:
            _fail(self, "training.profile.start_step",
                  f"must be in [1, training.profile.end_step={prof.end_step}]")
        if any(r < 0 for r in prof.ranks):
            _fail(self, "training.profile.ranks", "must be global ranks (>= 0)")


@dataclass
class OptimizerConfig:
    """AdamW through megatron-core's ``get_megatron_optimizer``."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 = no clipping

    def validate(self) -> None:
        _POSITIVE.check(self, "optimizer.adam_eps")
        _FRACTION.check(self, "optimizer.adam_beta1", "optimizer.adam_beta2")
        _NON_NEGATIVE.check(self, "optimizer.weight_decay", "optimizer.clip_grad")
        _POSITIVE.check(self, "optimizer.lr")


@dataclass
class ScheduleConfig:
    """Warmup-stable-decay over the whole run (both TST phases share one schedule)."""

    warmup_steps: int = 10
    decay_fraction: float = 0.1  # fraction of train_steps spent decaying, at the end
    decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    final_lr: float = 0.0

    def validate(self, training: TrainingConfig, optimizer: OptimizerConfig) -> None:
        """Its own ranges, the final LR against the peak, warmup plus decay against the run."""
        steps = training.train_steps
        _NON_NEGATIVE.check(self, "schedule.warmup_steps")
        if not 0.0 <= self.decay_fraction <= 1.0:
            _fail(self, "schedule.decay_fraction", "must be in [0, 1]")
        if not 0 <= self.final_lr <= optimizer.lr:
            _fail(self, "schedule.final_lr", f"must be in [0, optimizer.lr={optimizer.lr}]")
        decay = round(self.decay_fraction * steps)
        if self.warmup_steps >= steps:
            _fail(self, "schedule.warmup_steps",
                  f"must be less than training.train_steps={steps}: warmup would take the whole "
                  f"run")
        if self.warmup_steps + decay > steps:
            _fail(self, "schedule.warmup_steps",
                  f"warmup plus decay ({self.warmup_steps} + {decay} steps) exceeds "
                  f"training.train_steps={steps}")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None = <run_dir>/checkpoints
    save_interval: int = 0  # steps; 0 = only at the end
    save_final: bool = True
    keep_last: int = 2  # 0 = keep all
    load: str = "auto"  # auto: latest in dir if any | none | a checkpoint directory
    load_optimizer: bool = True  # false: fresh Adam moments (model, step, data, LR continue)
    # A new run's weights: a Hugging Face model directory or a megatron-tst checkpoint (e.g. from
    # `megatron-tst import`); step 0, fresh optimizer, the recipe's schedule. Unused on resume.
    init_from: Optional[str] = None
    # Write checkpoints in the background (megatron-core's dist_checkpointing async save):
    # training goes on while the files are written; the completion record and 'latest' follow
    # once every rank's write has finished (docs/reliability.md).
    async_save: bool = False
    # Recipe changes accepted on resume (keys or sections, e.g. [training.train_steps, schedule]);
    # see docs/checkpoints.md for what may change freely and what never can.
    allow_changes: list[str] = field(default_factory=list)

    def validate(self, run: RunConfig) -> None:
        """``run``: the whole config, whose keys and sections ``allow_changes`` may name."""
        _NON_NEGATIVE.check(self, "checkpoint.save_interval", "checkpoint.keep_last")
        for name in self.allow_changes:
            if not _is_key_or_section(run, name):
                _fail(self, "checkpoint.allow_changes", f"{name!r} is not a recipe key or section")
        if self.init_from is not None and not self.init_from:
            _fail(self, "checkpoint.init_from", "must be a Hugging Face model directory, a "
                  "checkpoint directory or null")
        if self.load not in ("auto", "none") and not self.load:
            _fail(self, "checkpoint.load", "must be 'auto', 'none' or a checkpoint directory")


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline unless WANDB_API_KEY is set
    wandb_project: str = "megatron-tst"
    tensorboard: bool = False
    log_memory: bool = False  # current and peak memory (CUDA allocated/reserved; RSS on CPU)
    # Peak dense bf16 TFLOP/s of one GPU, for MFU; None = from the table of known GPUs (or the
    # MEGATRON_TST_PEAK_TFLOPS environment variable). No MFU where neither knows the device.
    peak_tflops: Optional[float] = None
    timers: bool = True  # megatron-core timers (forward-backward, optimizer, ...), min/max over ranks

    def validate(self) -> None:
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            _fail(self, "logging.peak_tflops", "must be positive (or null for the GPU table)")


@dataclass
class DownstreamConfig:
    """lm-evaluation-harness on the run's weights while it trains (``training/downstream.py``)."""
    interval: int = 0  # steps between evaluations; 0 = never
    tasks: list[str] = field(default_factory=lambda: [
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande"])
    limit: Optional[int] = None  # examples per task; null = every example
    num_fewshot: Optional[int] = None  # null = the task's default
    batch_size: int = 8
    launcher: Literal["subprocess", "slurm"] = "subprocess"
    device: Optional[str] = None  # null: cpu with subprocess (the GPUs train), cuda with slurm
    dtype: Optional[Precision] = None  # null: float32 on cpu, bfloat16 on cuda
    slurm_args: list[str] = field(default_factory=list)  # sbatch options, e.g. [--gpus=1]
    include_path: Optional[str] = None  # a directory of lm-eval task YAMLs (local tasks)
    superposition: bool = False  # also evaluate superposition-phase weights (not next-token)
    at_end: bool = True  # evaluate the final weights too
    wait_minutes: float = 60.0  # how long the end of the run waits for pending evaluations


@dataclass
class EvaluationConfig:
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)

    def validate(self) -> None:
        d = self.downstream
        _NON_NEGATIVE.check(self, "evaluation.downstream.interval")
        _POSITIVE.check(self, "evaluation.downstream.batch_size",
                        "evaluation.downstream.wait_minutes")
        if d.limit is not None and d.limit <= 0:
            _fail(self, "evaluation.downstream.limit", "must be positive, or null for every "
                  "example")
        if d.interval and not d.tasks:
            _fail(self, "evaluation.downstream.tasks", "is empty: name lm-evaluation-harness "
                  "tasks, e.g. [arc_easy, piqa]")
        if d.slurm_args and d.launcher != "slurm":
            _fail(self, "evaluation.downstream.slurm_args", "apply to launcher: slurm only")


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

    def validate(self, training: TrainingConfig) -> None:
        steps = training.train_steps
        if self.bag_size < 1:
            _fail(self, "tst.bag_size", "must be >= 1 (1 = standard training)")
        if self.ratio is not None and self.superposition_steps is not None:
            _fail(self, "tst.superposition_steps",
                  "give tst.ratio or tst.superposition_steps, not both")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            _fail(self, "tst.ratio", "must be in [0, 1] (the paper recommends 0.2-0.4)")
        if self.superposition_steps is not None and not 0 <= self.superposition_steps <= steps:
            _fail(self, "tst.superposition_steps", f"must be in [0, training.train_steps={steps}]")
        if self.bag_size > 1 and self.ratio is None and self.superposition_steps is None:
            _fail(self, "tst.bag_size", "needs tst.ratio (or tst.superposition_steps) to say how "
                                        "long the superposition phase lasts")
        if self.weighting == "explicit":
            if self.slot_weights is None or len(self.slot_weights) != self.bag_size:
                _fail(self, "tst.slot_weights",
                      f"needs one weight per slot (tst.bag_size={self.bag_size})")
            if min(self.slot_weights) < 0 or sum(self.slot_weights) <= 0:
                _fail(self, "tst.slot_weights", "must be non-negative with a positive sum")
        elif self.slot_weights is not None:
            _fail(self, "tst.slot_weights", "is only used with tst.weighting=explicit")
        if self.weighting == "power_law" and self.power < 0:
            _fail(self, "tst.power", "must be >= 0")

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

    def validate(self, parallel: ParallelConfig) -> None:
        if self.implementation == "reference" and parallel.tensor_model_parallel_size > 1:
            _fail(self, "loss.implementation", "the reference loss needs full-vocabulary logits "
                                               "(TP=1); use fused, chunked or triton")


@dataclass
class MegatronConfig:
    """Any other megatron-core setting, by its megatron-core field name: ``transformer``
    (``TransformerConfig``), ``optimizer`` (``OptimizerConfig``), ``ddp``
    (``DistributedDataParallelConfig``). Names are checked against the installed megatron-core
    (``config/passthrough.py``): unknown ones get a did-you-mean, fields that a recipe key sets
    are refused with that key."""

    transformer: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    ddp: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.transformer or self.optimizer or self.ddp:
            from megatron_tst.config.passthrough import check_names

            check_names(self)


class _KeySources:
    """Where a loaded config's keys were set. A plain base class, not a dataclass: its attribute
    is no field, so it is no recipe key (strict keys, ``checkpoint.allow_changes``), not in
    ``to_dict()`` (checkpoints, the resume comparison, ``config_to_yaml``), not compared and
    not printed; ``copy.deepcopy`` keeps it, ``dataclasses.replace`` starts without it."""

    #: dotted key (or section) -> the recipe file or ``command line`` that set it; filled by
    #: ``loader.build_config``, read by ``loader.config_source``. Empty (and read-only) for a
    #: config built in code.
    _key_sources: Mapping[str, str] = types.MappingProxyType({})


@dataclass
class RunConfig(_KeySources):
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
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

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
        """Raise ``ConfigError`` for impossible combinations; ``world_size`` adds layout checks.

        Each section checks its own keys, given the sections its checks read; a section comes
        after those whose values it divides or compares with, so a config with one bad value
        fails on that value's key (not on a check that only reads it).
        """
        self.model.validate()
        self.parallel.validate(self.model)
        self.data.validate()
        self.training.validate()
        self.optimizer.validate()
        self.schedule.validate(self.training, self.optimizer)
        self.tst.validate(self.training)
        self.loss.validate(self.parallel)
        self.logging.validate()
        self.evaluation.validate()
        self.megatron.validate()
        self.checkpoint.validate(self)
        if world_size is not None:
            self.validate_layout(world_size)

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
        outside = [r for r in t.profile.ranks if r >= world_size]
        if t.profile.start_step is not None and outside:
            raise ConfigError(f"rank {outside[0]} is not in this run of {world_size} processes: "
                              f"give global ranks below {world_size}",
                              key="training.profile.ranks", value=t.profile.ranks)
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


def _fail(section: object, key: str, message: str) -> NoReturn:
    """Raise the ``ConfigError`` for ``key`` of ``section``: ``key`` is the full dotted key
    (``model.num_layers``, ``data.tokenizer.path``) whose first part names the section."""
    raise ConfigError(message, key=key, value=_value(section, key))


def _value(section: object, key: str) -> Any:
    """The value of the full dotted ``key`` read from its ``section``."""
    return _get(section, key.partition(".")[2])


@dataclass(frozen=True)
class _Range:
    """A condition each of some keys' values must meet, and the error when one does not."""

    ok: Callable[[Any], bool]
    message: str

    def check(self, section: object, *keys: str) -> None:
        """Fail on the first of ``keys`` (full dotted keys of ``section``) not ``ok``."""
        for key in keys:
            if not self.ok(_value(section, key)):
                _fail(section, key, self.message)


_POSITIVE_INT = _Range(lambda v: v >= 1, "must be a positive integer")
_POSITIVE_INT_OR_NULL = _Range(lambda v: v is None or v >= 1,
                               "must be a positive integer (or null for the default)")
_POSITIVE = _Range(lambda v: v > 0, "must be positive")
_NON_NEGATIVE = _Range(lambda v: v >= 0, "must be >= 0")
_FRACTION = _Range(lambda v: 0 <= v < 1, "must be in [0, 1)")
