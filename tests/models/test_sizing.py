"""The GPU presets: every recipe is built on the meta device through real megatron-core and its
parameter counts are checked against the sizes the recipes are named for and against the
analytic counts ``inspect`` prints; memory terms are checked against a real optimizer."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_tst.config import load_config
from megatron_tst.models.gpt import build_model, count_parameters
from megatron_tst.plan import padded_vocab_size
from megatron_tst.models.sizing import flops_per_step, memory_estimate, parameter_counts
from tests.conftest import REPO, read_metrics, run_cli

# recipe -> (nominal total, nominal active without embedding and LM head, exact total).
# Nominal sizes are the paper's names: untied embeddings with the 128k Llama-3 vocabulary make
# the small models a little lighter and the 3B a little heavier than their names.
PRESETS = {
    "270m": (270e6, None, 253_954_368),
    "600m": (600e6, None, 560_886_720),
    "3b": (3e9, None, 3_337_766_912),
    "10b-a1b": (10e9, 1e9, 10_416_399_872),
}
SINGLE_RANK = ["parallel.tensor_model_parallel_size=1", "parallel.expert_model_parallel_size=1",
               "parallel.sequence_parallel=false", "model.moe_grouped_gemm=false",
               "model.transformer_impl=local"]


def _load(name, overrides=()):
    return load_config(str(REPO / "configs" / f"{name}.yaml"), list(overrides))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_built_on_meta_device_has_the_expected_size(name, megatron_env):
    nominal, nominal_active, exact = PRESETS[name]
    cfg = _load(name, SINGLE_RANK)
    vocab = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    with torch.device("meta"):
        model = build_model(cfg, vocab)
    assert next(model.parameters()).is_meta
    built = count_parameters(model)
    assert built == exact == parameter_counts(cfg, vocab).total
    assert abs(built - nominal) / nominal < 0.15, f"{name}: {built:,} is not ~{nominal:,.0f}"

    # Active parameters from the built model: all but the experts a token is not routed to.
    m = cfg.model
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = built - (expert * (m.num_moe_experts - m.moe_router_topk) // m.num_moe_experts
                      if m.num_moe_experts else 0)
    counts = parameter_counts(cfg, vocab)
    assert counts.active == active
    if nominal_active:
        head = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith(("embedding.", "output_layer.")))
        assert abs(active - head - nominal_active) / nominal_active < 0.15


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_recipe_is_the_papers_setup_with_a_baseline_twin(name):
    cfg, twin = _load(name), _load(f"{name}-baseline")
    moe = name == "10b-a1b"
    positions = cfg.training.global_batch_size * cfg.model.seq_length
    assert positions == (8 if moe else 2) * 2 ** 20  # 2M (MoE: 8M) equivalent tokens per step
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2) == (0.9, 0.95)
    assert cfg.schedule.warmup_steps == 2000 and cfg.schedule.decay_fraction == 0.1
    assert cfg.schedule.decay_style == "linear" and cfg.model.untie_embeddings
    assert cfg.tst.bag_size == (16 if moe else 6)
    steps = cfg.tst.num_superposition_steps(cfg.training.train_steps)
    assert steps == (12483 if moe else 6000)
    # The twin differs only in its name and in having no superposition phase.
    a, b = cfg.to_dict(), twin.to_dict()
    assert twin.tst.bag_size == 1 and b.pop("name") != a.pop("name")
    a.pop("tst"), b.pop("tst")
    assert a == b
    for gpus in (8, 64):  # one node and eight
        cfg.validate_layout(gpus)


def test_flops_follow_the_paper_convention():
    cfg = _load("270m")
    m, t, vocab = cfg.model, cfg.training, 128256
    per_layer = (576 * (576 + 2 * 192) + 576 * 576) + 3 * 576 * 1536
    n = 30 * per_layer + 576 * vocab
    attention = 12 * 30 * m.seq_length * 576
    assert flops_per_step(cfg, vocab) == (6 * n + attention) * m.seq_length * t.global_batch_size


def test_memory_terms_match_a_real_model_and_optimizer(tiny_recipe, megatron_env):
    """Weights, fp32 gradient buffer and Adam state of a real megatron optimizer, 1 rank."""
    from megatron_tst.training.optim import build_optimizer, wrap_model

    for dtype in ("float32", "bfloat16"):
        cfg = load_config(str(tiny_recipe), [f"model.params_dtype={dtype}"])
        vocab = 128
        model = [wrap_model(cfg, build_model(cfg, vocab))]
        optimizer = build_optimizer(cfg, model)
        for p in model[0].parameters():
            p.main_grad.zero_()
        optimizer.step()  # materialises the Adam moments
        est = memory_estimate(cfg, vocab, world_size=1)
        weights = sum(p.numel() * p.element_size() for p in model[0].parameters())
        grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                    for b in model[0].buffers)
        state = 0
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner = opt.optimizer
            state += sum(t.numel() * t.element_size() for s in inner.state.values()
                         for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
            # fp32 main copies of half-precision weights (none for an fp32 model)
            state += 4 * sum(p.numel() for g in getattr(opt, "fp32_from_float16_groups", [])
                             for p in g)
        assert (est.weights, est.gradients, est.optimizer) == (weights, grads, state), dtype


def test_inspect_prints_a_recipe_report():
    out = run_cli(["inspect", "configs/10b-a1b.yaml", "--gpus", "64", "--json"]).stdout
    report = json.loads(out[out.index("{"):])
    assert report["parameters"]["total"] == PRESETS["10b-a1b"][2]
    assert report["layout"] == {**report["layout"], "gpus": 64, "dp": 64, "ep": 8}
    sup, rec = report["phases"]
    assert sup["data_tokens_per_step"] == 16 * rec["data_tokens_per_step"] == 16 * 8 * 2 ** 20
    assert sup["steps"] == [1, 12483] and rec["steps"] == [12484, 49983]
    assert 1.9e12 < report["run_data_tokens"] < 2.1e12  # the paper's ~2T for TST

    text = run_cli(["inspect", "configs/270m.yaml", "training.micro_batch_size=2"]).stdout
    assert "253,954,368" in text and "memory per GPU" in text and "micro-batch 2" in text
    bad = run_cli(["inspect", "configs/3b.yaml", "--gpus", "3"], check=False)
    assert bad.returncode == 2 and "world size 3" in bad.stderr and "Traceback" not in bad.stderr


def test_inspect_of_the_cpu_demo_recipe_as_documented():
    """A CPU recipe on its own processes, the vocabulary from the demo settings; a layout that
    does not fit names the GPU count it was checked on."""
    report = json.loads(run_cli(["inspect", "configs/demo-cpu.yaml", "--json"]).stdout)
    assert report["layout"]["gpus"] == 1 and report["model"]["vocab"] == 4096
    bad = run_cli(["inspect", "configs/demo-cpu.yaml", "training.global_batch_size=12",
                   "training.micro_batch_size=8"], check=False)
    assert bad.returncode == 2 and "--gpus 1, the default for a CPU recipe" in bad.stderr



def test_inspect_of_the_cpu_study_recipe_needs_no_gpu_count_or_vocabulary(synthetic_data):
    """A CPU recipe on indexed data (parallel.backend gloo) is planned for its own processes,
    and the vocabulary comes from the tokenizer it names."""
    report = json.loads(run_cli(["inspect", "configs/study-linux-doc-cpu.yaml", "--json",
                                 f"data.tokenizer.path={synthetic_data['tokenizer']}"]).stdout)
    assert report["layout"]["gpus"] == 1 and report["model"]["vocab"] == 96


SHRINK = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
          "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.seq_length=32",
          "model.vocab_size=null", "training.train_steps=4", "training.micro_batch_size=2",
          "training.global_batch_size=4", "training.eval_interval=0", "training.log_interval=1",
          "schedule.warmup_steps=1", "logging.wandb=false", "logging.tensorboard=false",
          "checkpoint.save_interval=0", "data.num_workers=0"]


@pytest.mark.slow  # the default suite trains 10b-a1b, shrunk, on preprocessed directories
@pytest.mark.parametrize("name", sorted(PRESETS))  # (tests/data/test_gpu_data_prep.py)
def test_preset_recipe_trains_when_shrunk(name, tmp_path, synthetic_data):
    """Every key of the GPU recipe except the sizes (bf16, distributed optimizer with overlap,
    qk-norm, NoPE layers, MoE routing, TST bag size) through 4 real steps on CPU."""
    d = synthetic_data
    moe = ["model.kv_channels=32", "model.num_moe_experts=4", "model.moe_router_topk=2",
           "model.moe_ffn_hidden_size=32", "tst.superposition_steps=2"] if name == "10b-a1b" else []
    run_cli(["train", f"configs/{name}.yaml", *SINGLE_RANK, *SHRINK, *moe,
             f"run_dir={tmp_path}", f"data.train_paths=[{d['train']}]", "data.train_weights=null",
             f"data.valid_paths=[{d['valid']}]", "data.tokenizer.type=sentencepiece",
             f"data.tokenizer.path={d['tokenizer']}", "data.tokenizer.eod_token=null"])
    train = read_metrics(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[0]["phase"] == "superposition" and train[-1]["phase"] == "recovery"
    assert all(r["loss"] == r["loss"] for r in train)  # finite


# The memory figures the GPU recipes' comments state, as `megatron-tst inspect` prints them.
RECIPE_MEMORY_COMMENTS = {
    ("3b", ()): 33.0,
    ("3b", ("training.micro_batch_size=4",)): 52.0,
    ("3b", ("model.recompute_granularity=selective", "model.recompute_modules=[mlp]")): 23.9,
    ("10b-a1b", ("model.recompute_granularity=null", "model.recompute_method=null",
                 "model.recompute_num_layers=null")): 48.0,
    ("10b-a1b", ()): 36.4,
}


@pytest.mark.parametrize("recipe,overrides", sorted(RECIPE_MEMORY_COMMENTS))
def test_recipe_comments_state_inspects_memory(recipe, overrides, capsys):
    """The GPU recipes' comments justify their recomputation settings with `inspect`'s
    estimate: the figures they state are the ones it prints."""
    from megatron_tst.cli import main

    text = (REPO / "configs" / f"{recipe}.yaml").read_text()
    assert f"`megatron-tst inspect configs/{recipe}.yaml`" in text
    expected = RECIPE_MEMORY_COMMENTS[recipe, overrides]
    assert f"~{round(expected)} GiB" in text
    assert main(["inspect", f"configs/{recipe}.yaml", *overrides]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory"))
    assert f"~{expected:.1f} GiB" in line, line


def test_recomputation_shrinks_the_activation_estimate():
    """Full recomputation of 1-layer units keeps each layer's input (2 bytes x L b h / TP with
    SP) plus one layer's activations; selective MLP recomputation drops the MLP's expanded
    width ((2 x 2 + 2) x FFN / h bytes per L b h for SwiGLU)."""
    base = _load("3b", ["model.recompute_granularity=null"])
    L, b, h, tp = 4096, 2, 2048, 2
    layers, f = base.model.num_layers, base.model.ffn_hidden_size
    none = memory_estimate(base, 128256, 8).activations
    per_layer = none / layers
    assert per_layer == pytest.approx(L * b * h * (18 + 6 * f / h) / tp)
    full = memory_estimate(_load("3b", ["model.recompute_granularity=full"]), 128256, 8)
    assert full.activations == pytest.approx(layers * 2 * L * b * h / tp + per_layer)
    mlp = memory_estimate(_load("3b", ["model.recompute_granularity=selective",
                                       "model.recompute_modules=[mlp]"]), 128256, 8)
    assert mlp.activations == pytest.approx(layers * L * b * h * 18 / tp)


def test_shared_expert_counted_like_megatron_builds_it(megatron_env):
    cfg = load_config(str(REPO / "configs" / "demo-cpu.yaml"), [
        "model.num_moe_experts=4", "model.moe_ffn_hidden_size=64",
        "model.moe_shared_expert_intermediate_size=96", "model.vocab_size=512"])
    with torch.device("meta"):
        model = build_model(cfg, 512)
    counts = parameter_counts(cfg, 512)
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared_experts." in n)
    assert shared == counts.shared_experts == cfg.model.num_layers * 3 * cfg.model.hidden_size * 96
    assert count_parameters(model) == counts.total


def test_inspect_commands_in_recipes_and_docs_run_as_written(capsys):
    """Every `megatron-tst inspect ...` that docs/recipes.md or a recipe comment shows runs."""
    import re
    import shlex

    from megatron_tst.cli import main

    texts = [(REPO / "docs" / "recipes.md").read_text(),
             *(p.read_text() for p in (REPO / "configs").glob("*.yaml"))]
    commands = {c for t in texts for c in re.findall(r"`(megatron-tst inspect configs/[^`]+)`", t)}
    assert len(commands) >= 3, commands
    for command in sorted(commands):
        argv = shlex.split(command)[1:]
        argv[1] = str(REPO / argv[1])
        assert main(argv) == 0, command
        assert "memory per GPU" in capsys.readouterr().out, command
