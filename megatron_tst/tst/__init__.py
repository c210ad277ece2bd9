"""Token-Superposition Training: bags, superposed embedding, multi-hot CE, phase schedule.

Each module is one concern and depends only on torch (and megatron-core where it extends a
megatron layer); the training loop wires them in (``training/step.py``, ``training/trainer.py``).
"""
