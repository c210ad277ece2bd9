"""megatron-tst: Token-Superposition Training (TST) on top of megatron-core."""

__version__ = "0.1.0"
