"""megatron-core settings from recipes: first-class keys, the checked ``megatron.*`` pass-through,
and GPU-only settings refused where they cannot run."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest
import torch

from megatron_tst.cli import main
from megatron_tst.config import ConfigError, load_config
from megatron_tst.config.passthrough import OWNED, megatron_classes
from megatron_tst.config.schema import FUSIONS, ModelConfig
from megatron_tst.models.gpt import build_transformer_config, transformer_config_kwargs
from megatron_tst.plan import RunPlan
from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo-cpu.yaml")
MOE = ["model.num_moe_experts=4", "model.moe_ffn_hidden_size=64"]


def refused(capsys, *args) -> str:
    assert main(["train", DEMO, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_every_field_the_project_sets_names_its_recipe_key():
    """``megatron.transformer`` cannot set what a recipe key sets: every TransformerConfig field
    ``transformer_config_kwargs`` fills is in OWNED, and every OWNED recipe key exists."""
    for overrides in ([], [*MOE, "model.recompute_granularity=full", "model.moe_z_loss_coeff=0.1"],
                      ["model.recompute_granularity=selective"]):
        cfg = load_config(DEMO, overrides)
        assert set(transformer_config_kwargs(cfg, RunPlan.build(cfg))) <= set(OWNED["transformer"])
    model_keys = {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}
    for section, owned in OWNED.items():
        fields = {f.name for f in dataclasses.fields(megatron_classes()[section])}
        assert set(owned) <= fields, (section, set(owned) - fields)
        for key in owned.values():
            if key.startswith("model."):
                assert key.split(" ")[0] in model_keys, key


def test_first_class_keys_reach_transformer_config():
    cfg = load_config(DEMO, [*MOE, "model.recompute_granularity=full",
                             "model.recompute_method=block", "model.recompute_num_layers=1",
                             "model.moe_router_score_function=sigmoid",
                             "model.moe_router_enable_expert_bias=true",
                             "model.moe_router_load_balancing_type=none",
                             "model.moe_router_dtype=fp32", "model.moe_z_loss_coeff=0.001",
                             "model.moe_shared_expert_intermediate_size=32",
                             "megatron.transformer.fp8_margin=2"])
    tc = build_transformer_config(cfg)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        "full", "block", 1)
    assert tc.moe_router_enable_expert_bias and tc.moe_router_score_function == "sigmoid"
    assert tc.moe_router_dtype == "fp32" and tc.moe_z_loss_coeff == 0.001
    assert tc.moe_shared_expert_intermediate_size == 32 and tc.fp8_margin == 2
    assert tc.moe_router_load_balancing_type == "none"
    # On a machine without transformer-engine every fusion is off (null = auto).
    if not torch.cuda.is_available():
        assert not any(getattr(tc, k) for k in FUSIONS)
    selective = build_transformer_config(load_config(DEMO, ["model.recompute_granularity=selective"]))
    assert selective.recompute_modules == ["core_attn"]


@pytest.mark.parametrize("overrides,key,message", [
    (["megatron.transformer.fp8_margn=1"], "megatron.transformer.fp8_margn",
     "did you mean megatron.transformer.fp8_margin?"),
    (["megatron.optimizer.adam_beta3=0.9"], "megatron.optimizer.adam_beta3", "did you mean"),
    (["megatron.ddp.bucket_sise=10"], "megatron.ddp.bucket_sise",
     "did you mean megatron.ddp.bucket_size?"),
    (["megatron.transformer.num_layers=3"], "megatron.transformer.num_layers",
     "set model.num_layers instead"),
    (["megatron.optimizer.lr=0.1"], "megatron.optimizer.lr", "set optimizer.lr instead"),
    (["megatron.ddp.grad_reduce_in_fp32=false"], "megatron.ddp.grad_reduce_in_fp32",
     "it is set by megatron-tst"),
    (["megatron.transformer.fp8_margin=x"], "megatron.transformer.fp8_margin",
     "expects an integer"),
    (["megatron.transformer.fp8_amax_compute_algo=mean"],
     "megatron.transformer.fp8_amax_compute_algo", "expects one of 'most_recent', 'max'"),
    (["megatron.transformer=3"], "megatron.transformer", "expected a mapping"),
    (["model.recompute_granularity=partial"], "model.recompute_granularity", "'full'"),
    (["model.recompute_modules=[core_attn]"], "model.recompute_modules",
     "needs model.recompute_granularity=selective"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[attn]"],
     "model.recompute_modules", "unknown module 'attn'"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[moe]"],
     "model.recompute_modules", "needs a MoE model"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform",
      "model.recompute_num_layers=3"], "model.recompute_num_layers", "must divide"),
    (["model.recompute_num_layers=1"], "model.recompute_num_layers",
     "needs model.recompute_granularity=full"),
    (["model.moe_z_loss_coeff=0.001"], "model.moe_z_loss_coeff", "needs model.num_moe_experts"),
    ([*MOE, "model.moe_router_enable_expert_bias=true"], "model.moe_router_enable_expert_bias",
     "moe_router_score_function=sigmoid"),
])
def test_bad_settings_name_key_and_fix(overrides, key, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, overrides)
    assert err.value.key == key and message in str(err.value), str(err.value)


def test_megatron_core_refusal_is_one_line_naming_the_key():
    cfg = load_config(DEMO, [*MOE, "megatron.transformer.moe_router_group_topk=2"])
    with pytest.raises(ConfigError) as err:
        build_transformer_config(cfg)
    assert err.value.key == "megatron.transformer.moe_router_group_topk"
    assert "megatron-core's TransformerConfig refuses these settings" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
@pytest.mark.parametrize("overrides,fix", [
    (["model.fp8=hybrid"], "set model.fp8=null to run here"),
    (["model.fp8=e4m3", "model.fp8_recipe=mxfp8"], "set model.fp8=null to run here"),
    (["model.apply_rope_fusion=true"], "set model.apply_rope_fusion=null or false to run here"),
    (["model.gradient_accumulation_fusion=true"], "null or false"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,layernorm]"],
     "leave layernorm out of model.recompute_modules to run here"),
])
def test_gpu_only_settings_refused_on_cpu_in_one_line(capsys, tmp_path, overrides, fix):
    err = refused(capsys, f"run_dir={tmp_path / 'run'}", *overrides)
    assert "needs a CUDA GPU with the transformer-engine spec (this machine has no CUDA " \
           "device)" in err and fix in err, err
    assert not (tmp_path / "run").exists()


def test_documented_examples_print_what_the_docs_show(capsys):
    """docs/recipes.md's `megatron` examples, run exactly as written."""
    text = (REPO / "docs" / "recipes.md").read_text()
    section = text.split("## `megatron`", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"^\$ (megatron-tst .*)\n(megatron-tst: .*)$", section, flags=re.M)
    assert len(examples) == 2
    for command, expected in examples:
        argv = shlex.split(command)[1:]
        argv[1] = str(REPO / argv[1])
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == expected
