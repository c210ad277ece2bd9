# megatron-tst for GPU clusters: NGC PyTorch ships CUDA, NCCL, transformer-engine and NVIDIA apex,
# so megatron-core uses the TE layer spec and fused kernels; the CPU compatibility layer is never
# loaded there (it only applies when CUDA is absent).
#   docker build -t megatron-tst .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/megatron-tst/runs \
#       -v /data:/workspace/megatron-tst/data megatron-tst \
#       torchrun --nproc-per-node 8 -m megatron_tst.cli train configs/270m.yaml
# On Slurm with enroot + pyxis: docs/launching.md (enroot import dockerd://megatron-tst, then
# MEGATRON_TST_IMAGE=... sbatch scripts/slurm/train.sbatch configs/270m.yaml).
ARG BASE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE}

WORKDIR /workspace/megatron-tst
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# Dependencies first for layer caching. The image's torch and transformer-engine are kept: pip
# sees them as satisfying the requirements and installs nothing over them. setup.py pins
# megatron-core to the release CI tests with this Python (0.19.2 on the image's Python 3.12), and
# `python -m megatron_tst.mcore` fails the build unless the image holds a tested pair.
COPY setup.py README.md ./
COPY megatron_tst/__init__.py megatron_tst/mcore.py megatron_tst/
RUN pip install -e ".[demo,hf,tensorboard]" \
    && python -m megatron_tst.mcore \
    && python -c "import megatron.core, transformer_engine, apex"

COPY . .
RUN pip install --no-deps -e . && megatron-tst --help > /dev/null

CMD ["megatron-tst", "--help"]
