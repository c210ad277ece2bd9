"""Recipe loading: inheritance, overrides, strict keys and types, cross-field checks."""

from pathlib import Path

import pytest
import yaml

from megatron_tst.config import ConfigError, load_config
from megatron_tst.config.loader import build_config, config_to_yaml

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def recipe(tmp_path):
    base = write(tmp_path / "base.yaml", {
        "name": "base", "data": {"source": "demo"},
        "model": {"hidden_size": 64, "num_attention_heads": 4, "num_layers": 2},
        "optimizer": {"lr": 1e-3},
    })
    return write(tmp_path / "child.yaml", {"base": base.name, "name": "child",
                                           "model": {"num_layers": 4}})


def test_base_inheritance_merges_depth_first(recipe):
    cfg = load_config(recipe)
    assert cfg.name == "child"
    assert cfg.model.num_layers == 4  # child wins
    assert cfg.model.hidden_size == 64  # kept from base
    assert cfg.optimizer.lr == 1e-3
    assert cfg.resolved_run_dir == "runs/child"


def test_dotted_overrides_are_typed(recipe):
    cfg = load_config(recipe, ["optimizer.lr=2e-4", "training.train_steps=7",
                               "logging.wandb=false", "data.train_paths=[a, b]",
                               "schedule.warmup_steps=1"])
    assert cfg.optimizer.lr == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string
    assert cfg.training.train_steps == 7
    assert cfg.logging.wandb is False
    assert cfg.data.train_paths == ["a", "b"]


def test_unknown_key_names_file_key_and_nearest(recipe):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["optimizer.lrr=1"])
    assert "command line" in str(err.value) and "did you mean 'optimizer.lr'" in str(err.value)

    bad = write(recipe.parent / "bad.yaml", {"base": "child.yaml", "model": {"hiden_size": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg and "model.hiden_size" in msg and "model.hidden_size" in msg


@pytest.mark.parametrize("override,expected", [
    ("model.num_layers=two", "expected an integer"),
    ("model.num_layers=2.5", "expected an integer"),
    ("logging.wandb=maybe", "expected true or false"),
    ("optimizer.lr=fast", "expected a number"),
    ("model.normalization=rmsnorm", "did you mean 'RMSNorm'"),
    ("data.train_paths=x", "expected a list"),
])
def test_wrong_types_are_rejected(recipe, override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(recipe, [override])


@pytest.mark.parametrize("overrides,key", [
    (["model.num_attention_heads=5"], "model.num_attention_heads"),
    (["model.num_query_groups=3"], "model.num_query_groups"),
    (["parallel.tensor_model_parallel_size=8"], "parallel.tensor_model_parallel_size"),
    (["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["parallel.context_parallel_size=2"], "parallel.context_parallel_size"),
    (["parallel.virtual_pipeline_model_parallel_size=2"],
     "parallel.virtual_pipeline_model_parallel_size"),
    (["parallel.expert_model_parallel_size=2"], "parallel.expert_model_parallel_size"),
    (["schedule.warmup_steps=100", "training.train_steps=100"], "schedule.warmup_steps"),
    (["schedule.final_lr=1.0"], "schedule.final_lr"),
    (["data.source=indexed"], "data.train_paths"),
    (["training.exit_at_step=0"], "training.exit_at_step"),
    # one bad value that checks of other sections read too: the error names its own key
    (["parallel.tensor_model_parallel_size=0"], "parallel.tensor_model_parallel_size"),
    (["model.num_attention_heads=0"], "model.num_attention_heads"),
    (["training.train_steps=0"], "training.train_steps"),
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["schedule.warmup_steps=-1"], "schedule.warmup_steps"),
    (["model.num_moe_experts=1", "model.moe_router_topk=2"], "model.moe_router_topk"),
    (["loss.implementation=reference", "parallel.tensor_model_parallel_size=2"],
     "loss.implementation"),
    (["checkpoint.load="], "checkpoint.load"),
    (["data.demo_vocab_size=100"], "data.demo_vocab_size"),
])
def test_impossible_combinations_fail_early(recipe, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, overrides)
    assert err.value.key == key
    assert err.value.source is not None


def test_error_names_the_file_that_set_the_key(recipe):
    write(recipe.parent / "heads.yaml", {"base": "child.yaml", "model": {"num_attention_heads": 6}})
    with pytest.raises(ConfigError) as err:
        load_config(recipe.parent / "heads.yaml")
    assert str(err.value).startswith(str(recipe.parent / "heads.yaml"))


def test_layout_checks_against_world_size(recipe):
    cfg = load_config(recipe, ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.validate_layout(3)
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(recipe, ["training.global_batch_size=6", "training.micro_batch_size=4"],
                    world_size=1)


def test_missing_base_and_cycles(tmp_path):
    a = write(tmp_path / "a.yaml", {"base": "b.yaml"})
    with pytest.raises(ConfigError, match="not found"):
        load_config(a)
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def test_bad_override_syntax(recipe):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(recipe, ["optimizer.lr"])


def test_round_trip_through_yaml(recipe):
    cfg = load_config(recipe, ["optimizer.lr=5e-4"])
    again = build_config(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    cfg = load_config(path)
    assert cfg.name


def test_recipes_that_are_not_regular_files_and_warmup_over_the_run(tmp_path):
    """``/dev/zero`` exists but is no recipe; warmup that takes every step says so."""
    for path in ("/dev/zero", "/dev/null"):
        with pytest.raises(ConfigError, match="is not a regular file"):
            load_config(path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: /dev/zero\n")
    with pytest.raises(ConfigError, match=r"/dev/zero \(named as base by .*\) is not a regular file"):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match="must be less than training.train_steps=2: warmup"):
        load_config(None, ["data.source=demo", "training.train_steps=2",
                           "schedule.warmup_steps=2"])
    with pytest.raises(ConfigError, match=r"warmup plus decay \(5 \+ 6 steps\) exceeds"):
        load_config(None, ["data.source=demo", "training.train_steps=10",
                           "schedule.warmup_steps=5", "schedule.decay_fraction=0.6"])
