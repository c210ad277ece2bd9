"""Run configuration: typed dataclasses, YAML recipes with ``base:`` inheritance, dotted overrides."""

from megatron_tst.config.errors import ConfigError
from megatron_tst.config.loader import apply_overrides, build_config, load_config
from megatron_tst.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "apply_overrides", "build_config", "load_config"]
