"""Checkpoints in and out of megatron-tst (``docs/hugging-face.md``): ``megatron-tst export``
(Hugging Face model directories), ``megatron-tst import`` and ``checkpoint.init_from``, and the
checkpoint reading that ``megatron-tst eval`` shares.

- ``source``: find and read a checkpoint, rebuild its config for a layout, locate its tokenizer,
  build the model and load only its weights (resharding from any saved layout);
- ``mapping``: the one megatron <-> Hugging Face weight table, each rule in both directions;
- ``hf``: the architecture choice, ``config.json``, safetensors (export);
- ``hf_import``: a Hugging Face directory checked and saved as a step-0 checkpoint (import);
- ``init_from``: a fresh run's weights from either (handed to the trainer by the CLI);
- ``tokenizer``: the run's tokenizer as ``tokenizer.json`` / ``tokenizer_config.json``;
- ``arguments``: the commands' command-line arguments.
"""
