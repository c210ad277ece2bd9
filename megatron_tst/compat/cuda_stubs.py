"""CPU stand-ins for the ``torch.cuda`` runtime calls megatron-core makes unconditionally.

On a CPU build they raise ("Torch not compiled with CUDA enabled", "torch.cuda.Stream requires
CUDA support"). On the CPU every op is synchronous and there is one device, so streams and events
are no-ops, ``current_device()`` is 0 (mapped to ``cpu`` by the device mode), and the "CUDA" RNG
is the CPU default generator.
"""

from __future__ import annotations

import contextlib
import time

import torch

from . import device


class Event:
    """``torch.cuda.Event`` on the CPU: records wall time so ``elapsed_time`` still works."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, external=False):
        self._t = time.perf_counter()

    def record(self, stream=None):
        self._t = time.perf_counter()

    def elapsed_time(self, end_event) -> float:
        return (end_event._t - self._t) * 1000.0

    def wait(self, stream=None): ...

    def synchronize(self): ...

    def query(self) -> bool:
        return True


class Stream:
    """``torch.cuda.Stream`` on the CPU: every op is complete when it returns."""

    def __init__(self, device=None, priority=0, **kwargs): ...

    def wait_stream(self, stream): ...

    def wait_event(self, event): ...

    def synchronize(self): ...

    def query(self) -> bool:
        return True

    def record_event(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def __enter__(self):
        return self

    def __exit__(self, *exc): ...


_DEFAULT_STREAM = Stream()


def patch_streams_events() -> None:
    """``torch.cuda.Stream/Event/stream/current_stream/synchronize`` raise on the CPU build; megatron
    calls them in ``MoEAlltoAllTokenDispatcher`` (a d2h stream), DDP, p2p and dist_checkpointing
    (``filesystem_async.preload_tensors`` synchronizes). Synchronous no-ops are exact on the CPU."""
    cuda = torch.cuda
    cuda.Stream, cuda.Event = Stream, Event
    cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    cuda.current_stream = cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.set_stream = lambda stream: None
    cuda.synchronize = lambda device=None: None
    device.ignore_record_stream()


def patch_current_device() -> None:
    """``torch.cuda.current_device()`` (DDP buffers, ``GlobalMemoryBuffer``, p2p, mappings) raises on
    the CPU build: return 0, which the device mode maps to cpu; ``set_device`` is a no-op."""
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda device: None


def patch_rng() -> None:
    """``torch.cuda.get_rng_state/set_rng_state/manual_seed`` use the CPU default generator."""
    cuda = torch.cuda
    cuda.get_rng_state = cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = cuda.random.set_rng_state = lambda s, device="cuda": torch.set_rng_state(s)
    cuda.manual_seed = cuda.random.manual_seed = lambda seed: torch.default_generator.manual_seed(
        int(seed)
    )
