"""Process group and megatron ``parallel_state`` set-up: gloo on CPU, nccl on GPU.

Launched by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) or
as a plain single process, which gets a one-rank group on a free local port.

A worker of ``torchrun`` ends itself when its agent dies (:func:`watch_launcher`): torchrun
starts its workers in sessions of their own and does not end them when it is killed, so a node
whose agent is gone (kill -9, the OOM killer) kept training for the other nodes while the
launcher restarted a new agent beside it (found on the two-node test cluster).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_tst.config import ConfigError, RunConfig

log = logging.getLogger("megatron_tst")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_logging_rank(self) -> bool:
        """The last rank: it sits on the last pipeline stage, where the loss is."""
        return self.rank == self.world_size - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RunConfig) -> DistEnv:
    """Initialise torch.distributed and megatron's model-parallel groups for ``cfg.parallel``."""
    from megatron.core import parallel_state

    if not torch.cuda.is_available():
        from megatron_tst.compat import apply_cpu_compat

        from .cpu_allocator import keep_freed_memory

        apply_cpu_compat()
        keep_freed_memory()

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker
        watch_launcher()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cfg.validate_layout(world_size)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("nccl needs CUDA devices; use gloo on CPU machines",
                          key="parallel.backend", value=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    p = cfg.parallel
    if backend == "nccl":
        flight_recorder_env(cfg.resolved_run_dir)
    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            init_method = "env://"
        dist.init_process_group(backend=backend, init_method=init_method,
                                rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=p.timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            distributed_timeout_minutes=p.timeout_minutes,
        )
    seed_everything(cfg.seed)
    return DistEnv(rank, world_size, local_rank, device, backend)


_watching = False


def watch_launcher(poll_s: float = 1.0) -> None:
    """End this process and its children (SIGKILL to its process group, when it leads one as
    torchrun's workers do) within ``poll_s`` of its parent's death: a daemon thread compares
    ``os.getppid()`` with the parent at the start. The other ranks then fail in their next
    collective, their agents end, and the launcher's in-job restart (or the scheduler) starts
    every node again from the last checkpoint. ``exit_status.json`` stays ``running``: a crash."""
    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("rank %s: the launcher that started this process (torchrun agent, pid %d) is "
                  "gone: ending this rank and its children so that the other ranks fail fast "
                  "and the job can restart from its last checkpoint", os.environ.get("RANK", "?"),
                  parent)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def flight_recorder_env(run_dir: str, environ: Optional[dict] = None) -> dict:
    """NCCL's flight recorder (the last collectives of every process group, dumped when one
    times out) into ``<run_dir>/hang/nccl_trace_rank_<R>``: set before the process group exists,
    each only where neither its name nor torch's newer ``TORCH_FR_*`` one is set (a user's or
    launcher's value wins). Returns what was set."""
    environ = os.environ if environ is None else environ
    wanted = ((("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"), "2000"),
              (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1"),
              (("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"),
               os.path.join(os.path.abspath(run_dir), "hang", "nccl_trace_rank_")))
    added = {names[0]: value for names, value in wanted
             if not any(n in environ for n in names)}
    environ.update(added)  # torch does not create hang/: the trainer does (training/watchdog.py)
    return added


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs, and megatron's per-TP-rank model-parallel RNG tracker.

    Pipeline stages get distinct seeds (as in Megatron-LM) so that dropout differs across layers.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
