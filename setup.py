"""megatron-tst: Token-Superposition Training on top of megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-tst",
    version="0.1.0",
    description="Megatron-Core pre-training with Token-Superposition Training (TST)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The tested (Python, megatron-core) pairs: megatron_tst/mcore.py TESTED, CI's two legs.
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["megatron_tst", "megatron_tst.*"]),
    include_package_data=True,
    package_data={"megatron_tst": ["py.typed"]},
    install_requires=[
        # torch is installed first, explicitly (`pip install torch==2.13.0` on CPU machines, the
        # NGC image's build on GPU clusters), so this range never pulls a second torch build.
        "torch>=2.4",
        # Exactly the releases CI tests, one per Python (megatron_tst/mcore.py TESTED; a test
        # compares them): 0.16.1 is the newest release for Python 3.11; 0.19.2 is what the
        # GPU image (NGC PyTorch, Python 3.12) installs.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core==0.19.2; python_version >= '3.12'",
        "packaging",
        "psutil",  # dist_checkpointing's async writer needs it (undeclared by megatron-core)
        "sentencepiece>=0.2",
        "numpy",
        "PyYAML>=6",
        "wandb",
        "tqdm",
        # preprocess: DCLM's .jsonl.zst shards, FineWeb-Edu's parquet shards and Hugging Face
        # datasets saved to disk (arrow), read streaming (docs/data.md)
        "zstandard",
        "pyarrow",
    ],
    extras_require={
        "demo": ["gensim==4.4.0"],  # ships the real English demo corpus (Wikipedia pages, news)
        # hf: Hugging Face tokenizer.json files; megatron-tst export / eval (docs/hugging-face.md)
        "hf": ["tokenizers>=0.15", "transformers>=4.56", "safetensors", "protobuf"],
        "tensorboard": ["tensorboard"],
        "study": ["matplotlib", "scipy"],  # megatron-tst study: plot and significance test
        # eval: evaluation.downstream, lm-evaluation-harness on the run's weights as it trains
        "eval": ["lm-eval==0.4.13", "accelerate", "tokenizers>=0.15", "transformers>=4.56",
                 "safetensors", "protobuf"],
        # triton: the fused-linear loss kernels' tests run on CPU through Triton's interpreter
        # (no torch dependency; ~270 MB wheel, Linux only).
        "dev": ["pytest>=7", "pytest-timeout", "pytest-xdist", "gensim==4.4.0", "tokenizers>=0.15",
                "tensorboard",
                "transformers>=4.56", "safetensors", "protobuf",
                "matplotlib", "scipy", "triton>=3.0; platform_system == 'Linux'",
                # the data tests write a real Hugging Face dataset with save_to_disk
                "datasets", "lm-eval==0.4.13", "accelerate"],
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-tst=megatron_tst.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
