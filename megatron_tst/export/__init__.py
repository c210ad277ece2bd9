"""Checkpoints out of megatron-tst: ``megatron-tst export`` (Hugging Face model directories) and
the checkpoint reading that ``megatron-tst eval`` shares (``docs/hugging-face.md``).

- ``source``: find and read a checkpoint, rebuild its config for a layout, locate its tokenizer,
  build the model and load only its weights (resharding from any saved layout);
- ``hf``: the architecture choice, the weight mapping, ``config.json``, safetensors;
- ``tokenizer``: the run's tokenizer as ``tokenizer.json`` / ``tokenizer_config.json``;
- ``arguments``: the two commands' command-line arguments.
"""
