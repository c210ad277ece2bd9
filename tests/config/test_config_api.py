"""The config package's own API: it imports nothing else of megatron_tst, each section validates
its own keys, provenance is no recipe key, overrides apply to plain dicts."""

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from megatron_tst import config as config_package
from megatron_tst.config import ConfigError, RunConfig, apply_overrides, build_config, load_config
from megatron_tst.config.loader import CLI, config_source, config_to_yaml
from megatron_tst.config.schema import (ModelConfig, OptimizerConfig, ParallelConfig,
                                        ScheduleConfig, TrainingConfig)
from megatron_tst.config.signals import signal_number


def test_config_imports_nothing_else_of_the_package():
    for path in Path(config_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] == "megatron_tst":
                    assert name.startswith("megatron_tst.config"), (path.name, name)


def test_signal_names_are_parsed_in_the_config_package():
    from megatron_tst.training import signals

    assert signals.signal_number is signal_number
    with pytest.raises(ValueError, match="unknown signal 'SIGFOO'"):
        signal_number("SIGFOO")


@pytest.fixture
def demo_recipe(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "demo"}, "optimizer": {"lr": 1e-3}}))
    return path


def test_key_sources_are_declared_but_no_recipe_key(demo_recipe):
    cfg = load_config(demo_recipe, ["training.train_steps=20"])
    assert cfg._key_sources == {"data": str(demo_recipe), "data.source": str(demo_recipe),
                                "optimizer": str(demo_recipe), "optimizer.lr": str(demo_recipe),
                                "training.train_steps": CLI}
    assert config_source(cfg, "optimizer.lr") == str(demo_recipe)
    assert config_source(cfg, "training.train_steps") == CLI
    assert "_key_sources" not in {f.name for f in dataclasses.fields(cfg)}
    assert "_key_sources" not in cfg.to_dict() and "_key_sources" not in config_to_yaml(cfg)
    assert "_key_sources" not in repr(cfg)
    # Built in code: empty, and the shared default cannot be written to.
    assert config_source(RunConfig(), "optimizer.lr") is None
    with pytest.raises(TypeError):
        RunConfig()._key_sources["x"] = "y"
    # Copies: deepcopy keeps the sources, replace starts without them; neither changes equality.
    deep = copy.deepcopy(cfg)
    assert deep == cfg and config_source(deep, "training.train_steps") == CLI
    replaced = dataclasses.replace(cfg, seed=7)
    assert replaced.seed == 7 and config_source(replaced, "training.train_steps") is None
    assert dataclasses.replace(replaced, seed=cfg.seed) == cfg


def test_key_sources_cannot_be_set_or_allowed_by_a_recipe(demo_recipe):
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config(demo_recipe, ["_key_sources={}"])
    assert err.value.key == "_key_sources"
    with pytest.raises(ConfigError, match="'_key_sources' is not a recipe key") as err:
        load_config(demo_recipe, ["checkpoint.allow_changes=[_key_sources]"])
    assert err.value.key == "checkpoint.allow_changes" and err.value.source == CLI


def test_apply_overrides_to_a_plain_dict():
    tree = {"optimizer": {"lr": 1.0}, "data": {"source": "demo"}}
    sources = apply_overrides(tree, ["optimizer.lr=2e-4", "training.train_steps=7",
                                     "data.train_paths=[a, b]", "logging.wandb=false",
                                     "name="])
    assert tree == {"optimizer": {"lr": "2e-4"}, "training": {"train_steps": 7},
                    "data": {"source": "demo", "train_paths": ["a", "b"]},
                    "logging": {"wandb": False}, "name": ""}
    assert sources == {"optimizer.lr": CLI, "training.train_steps": CLI,
                       "data.train_paths": CLI, "logging.wandb": CLI, "name": CLI}
    assert apply_overrides({}, []) == {}
    with pytest.raises(ConfigError, match="section.key=value") as err:
        apply_overrides({}, ["optimizer.lr"])
    assert err.value.source == CLI
    # The sources make build_config's errors name the command line.
    tree = {"data": {"source": "demo"}}
    with pytest.raises(ConfigError) as err:
        build_config(tree, apply_overrides(tree, ["model.num_layers=0"]))
    assert (err.value.key, err.value.source) == ("model.num_layers", CLI)


def test_each_section_validates_its_own_keys():
    ModelConfig().validate()
    with pytest.raises(ConfigError, match="must be a positive integer") as err:
        ModelConfig(num_layers=0).validate()
    assert (err.value.key, err.value.value) == ("model.num_layers", 0)
    with pytest.raises(ConfigError, match="must divide model.num_attention_heads=6") as err:
        ParallelConfig(tensor_model_parallel_size=4).validate(ModelConfig(num_attention_heads=6,
                                                                          hidden_size=96))
    assert (err.value.key, err.value.value) == ("parallel.tensor_model_parallel_size", 4)
    with pytest.raises(ConfigError, match=r"must be in \[0, optimizer.lr=0.001\]") as err:
        ScheduleConfig(final_lr=0.01).validate(TrainingConfig(), OptimizerConfig(lr=1e-3))
    assert (err.value.key, err.value.value) == ("schedule.final_lr", 0.01)
    with pytest.raises(ConfigError, match="unknown signal") as err:
        TrainingConfig(exit_signals=["SIGFOO"]).validate()
    assert (err.value.key, err.value.value) == ("training.exit_signals", ["SIGFOO"])
