"""Efficiency, memory and timing of training steps: what the trainer adds to every metrics record.

- **TFLOP/s per GPU and MFU.** The recipe's model FLOPs per optimizer step (``models/sizing.py``,
  the whole step over all GPUs, equal in both TST phases) over the step's wall time and the
  world size; MFU divides by the peak dense bf16 TFLOP/s of one GPU: ``logging.peak_tflops``,
  else ``MEGATRON_TST_PEAK_TFLOPS``, else :data:`PEAK_TFLOPS` matched against
  ``torch.cuda.get_device_name()``; unknown (a CPU, an unlisted GPU) = no MFU (null).
- **Elapsed time and ETA** of this job: the ETA is the steps left to this job's last step
  (``training.exit_at_step`` or ``train_steps``) times the mean wall time of the recent steps,
  evaluations and saves included.
- **Memory** (``logging.log_memory``), the largest value over the ranks: CUDA allocated, reserved
  and peak allocated; on the CPU the resident set size and its peak.
- **Timers** (``logging.timers``): megatron-core's ``Timers`` for forward-backward, optimizer,
  data (the wait for the next micro-batch), evaluation and checkpoint save, min and max over the
  ranks, and megatron-core's ``StragglerDetector`` (CUDA only: it times with CUDA events).

The per-step numbers are local; the interval report (timers, memory, straggler) is a collective
that every rank calls at the same steps (``PerfMonitor.interval``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_tst.config import ConfigError, RunConfig

log = logging.getLogger("megatron_tst")

GiB = 1024 ** 3
PEAK_ENV = "MEGATRON_TST_PEAK_TFLOPS"

#: Peak dense (no sparsity) bf16 tensor-core TFLOP/s of one GPU, from NVIDIA's data sheets:
#: (model, variant, TFLOP/s). A device name matches a row when its words (split at spaces and
#: hyphens, case ignored) contain the model and, if given, the variant; the first match wins, so
#: variants come before their model's default row. "GH200" and "GB200" are words of their own:
#: an H200 row does not match a GH200, nor a B200 row a GB200 (not listed: no MFU).
PEAK_TFLOPS: tuple[tuple[str, Optional[str], float], ...] = (
    ("a100", None, 312.0),  # A100 SXM and PCIe
    ("h100", "pcie", 756.0),
    ("h100", "nvl", 835.0),
    ("h100", None, 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("h200", "nvl", 835.0),
    ("h200", None, 989.0),  # H200 SXM
    ("gh200", None, 989.0),
    ("b200", None, 2250.0),
)

#: Timers, in report order: forward_backward, optimizer and data are reported per step (their
#: mean over the logging interval); eval and save as the seconds they took in the interval.
TIMERS = ("forward_backward", "optimizer", "data", "eval", "save")
PER_STEP_TIMERS = ("forward_backward", "optimizer", "data")


def table_peak_tflops(device_name: str) -> Optional[float]:
    """The :data:`PEAK_TFLOPS` entry for a ``torch.cuda.get_device_name()``, None if unlisted."""
    words = set(re.split(r"[\s\-_]+", device_name.lower()))
    for model, variant, tflops in PEAK_TFLOPS:
        if model in words and (variant is None or variant in words):
            return tflops
    return None


@dataclass(frozen=True)
class Peak:
    tflops: Optional[float]  # None = unknown: no MFU
    source: str  # for the log: where the number comes from


def resolve_peak(recipe_tflops: Optional[float], device: torch.device,
                 environ: Optional[dict] = None) -> Peak:
    """The peak TFLOP/s of one GPU: the recipe's ``logging.peak_tflops``, else the environment
    variable, else the table entry for the CUDA device, else unknown."""
    environ = os.environ if environ is None else environ
    if recipe_tflops is not None:
        return Peak(float(recipe_tflops), "logging.peak_tflops")
    raw = environ.get(PEAK_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise ConfigError("must be a positive number of TFLOP/s (peak dense bf16 of one GPU); "
                              "unset it to use the GPU table", key=PEAK_ENV, value=raw,
                              source="environment")
        return Peak(value, PEAK_ENV)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = table_peak_tflops(name)
        if tflops is not None:
            return Peak(tflops, f"the table entry for {name}")
        return Peak(None, f"{name} is not in the peak table")
    return Peak(None, f"the peak of a {device.type} device is unknown")


def tflops_per_gpu(flops_per_step: float, step_time_s: float, world_size: int) -> float:
    """Model TFLOP/s of one GPU: the whole step's FLOPs (all GPUs) over its time and the GPUs."""
    return flops_per_step / step_time_s / world_size / 1e12


def mfu(tflops: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation, a fraction (0..1); None when the peak is unknown."""
    return None if peak_tflops is None else tflops / peak_tflops


def memory_gib(device: torch.device) -> dict[str, float]:
    """This process's memory in GiB: CUDA allocated, reserved and peak allocated on a CUDA
    device; otherwise the resident set size (``/proc/self/statm``) and its peak (``getrusage``)."""
    if device.type == "cuda":
        return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / GiB,
                "mem_reserved_gib": torch.cuda.memory_reserved(device) / GiB,
                "mem_peak_gib": torch.cuda.max_memory_allocated(device) / GiB}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (macOS)
        import psutil

        rss = psutil.Process().memory_info().rss
    return {"rss_gib": rss / GiB, "rss_peak_gib": max(peak_bytes, rss) / GiB}


def max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value's maximum over all ranks (a collective: every rank calls it)."""
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


class StepTimers:
    """megatron-core ``Timers`` for the names in :data:`TIMERS`; inert when ``enabled`` is False.

    ``time(name)`` times a block (megatron's timer synchronizes CUDA at start and stop, so GPU
    work is counted where it runs); ``data(iterator)`` adds the host time each ``next()`` waits
    for a micro-batch, without synchronizing (it must not stall the GPU queue once per
    micro-batch). ``report(steps)`` is a collective."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._timers = None
        if enabled:
            from megatron.core.timers import Timers

            self._timers = Timers(log_level=2, log_option="minmax")

    @contextlib.contextmanager
    def time(self, name: str):
        if not self.enabled:
            yield
            return
        timer = self._timers(name)
        timer.start()
        try:
            yield
        finally:
            timer.stop()

    def add(self, name: str, seconds: float) -> None:
        timer = self._timers(name)
        timer.set_elapsed(timer.elapsed(reset=False) + seconds)

    def data(self, iterator):
        """``iterator`` (or each of a list, for the interleaved schedule) with its waits timed."""
        if not self.enabled:
            return iterator
        if isinstance(iterator, list):
            return [_TimedIterator(it, self) for it in iterator]
        return _TimedIterator(iterator, self)

    def report(self, steps: int) -> dict[str, float]:
        """``time_<name>_min_s`` / ``_max_s`` over the ranks for the timers that ran since the
        last report (per step for :data:`PER_STEP_TIMERS`, ``steps`` of them; totals for eval and
        save), and reset them. Every rank must call it at the same step: it all-gathers."""
        if not self.enabled:
            return {}
        # megatron's min/max across ranks (all-gather of a [world, names] tensor, zeros, i.e.
        # timers that did not run, left out); the numbers are only exposed by this private
        # method, the same in megatron-core 0.16 and 0.19 (tests run both lines).
        min_max = self._timers._get_global_min_max_time(list(TIMERS), reset=True, barrier=False,
                                                        normalizer=1.0)
        out = {}
        for name in TIMERS:
            if name in min_max:
                lo, hi = min_max[name]
                div = steps if name in PER_STEP_TIMERS else 1
                out[f"time_{name}_min_s"], out[f"time_{name}_max_s"] = lo / div, hi / div
        return out


class _TimedIterator:
    def __init__(self, iterator: Iterator, timers: StepTimers):
        self._it, self._timers = iterator, timers

    def __iter__(self):
        return self

    def __next__(self):
        tic = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self._timers.add("data", time.perf_counter() - tic)


class Straggler:
    """megatron-core's ``StragglerDetector`` around forward-backward (CUDA events, so CUDA only,
    and it reads GPU temperature, power and clocks through ``pynvml``). ``report`` is a
    collective; megatron logs the fastest and slowest rank's time and TFLOP/s on rank 0."""

    def __init__(self, enabled: bool, world_size: int, rank: int):
        self.detector = None
        self.off_because: Optional[str] = None  # why it is off, for the log
        if not enabled:
            return
        if not torch.cuda.is_available():
            self.off_because = "it needs CUDA"
            return
        import importlib.util

        if importlib.util.find_spec("pynvml") is None:
            self.off_because = "it needs pynvml (pip install nvidia-ml-py)"
            return
        from megatron.core.utils import StragglerDetector

        self.detector = StragglerDetector()
        # amp=1: it times the whole forward-backward, not the forward alone (megatron's 3.0).
        self.detector.configure(world_size, rank, amp=1.0, enabled=True)

    def __enter__(self):
        if self.detector is not None:
            self.detector.__enter__()
        return self

    def __exit__(self, *exc):
        if self.detector is not None:
            self.detector.__exit__(*exc)
        return False

    def report(self, flops: float, steps: int) -> None:
        if self.detector is not None:
            self.detector.report(total_flops=flops, log_interval=steps)


class PerfMonitor:
    """What the trainer adds to the metrics: ``step()`` every step (local), ``interval()`` at
    every logged step (a collective: every rank calls it at the same steps)."""

    ETA_WINDOW = 50  # steps whose mean wall time gives the ETA

    def __init__(self, cfg: RunConfig, device: torch.device, world_size: int, rank: int,
                 flops_per_step: int, announce: bool):
        self.device, self.world_size = device, world_size
        self.flops_per_step = flops_per_step
        self.log_memory = cfg.logging.log_memory
        self.peak = resolve_peak(cfg.logging.peak_tflops, device)
        self.timers = StepTimers(cfg.logging.timers)
        self.straggler = Straggler(cfg.logging.timers, world_size, rank)
        if announce:  # into the run's log file (training/console.py), not the terminal
            from megatron_tst.training.console import FILE_ONLY

            if self.peak.tflops is None:
                log.info("MFU not reported (null): %s; set logging.peak_tflops or %s",
                         self.peak.source, PEAK_ENV, extra=FILE_ONLY)
            else:
                log.info("MFU against a peak of %g TFLOP/s per GPU (%s)", self.peak.tflops,
                         self.peak.source, extra=FILE_ONLY)
            if self.straggler.off_because:
                log.info("straggler detector off: %s", self.straggler.off_because,
                         extra=FILE_ONLY)
        self.start()

    def start(self) -> None:
        """Start the elapsed-time clock (the training loop's start)."""
        self._start = self._last = time.time()
        self._recent: deque[float] = deque(maxlen=self.ETA_WINDOW)
        self._steps_in_interval = 0

    def step(self, step: int, step_time_s: float, last_step: int) -> dict:
        """``tflops_per_gpu``, ``mfu``, ``elapsed_s`` and ``eta_s`` of a completed step."""
        now = time.time()
        self._recent.append(now - self._last)
        self._last = now
        self._steps_in_interval += 1
        tflops = tflops_per_gpu(self.flops_per_step, step_time_s, self.world_size)
        eta = max(last_step - step, 0) * sum(self._recent) / len(self._recent)
        return {"tflops_per_gpu": tflops, "mfu": mfu(tflops, self.peak.tflops),
                "elapsed_s": now - self._start, "eta_s": eta}

    def interval(self) -> dict:
        """Timers (min/max over the ranks) and memory (max over the ranks) since the last call.
        A collective."""
        steps, self._steps_in_interval = max(self._steps_in_interval, 1), 0
        out = self.timers.report(steps)
        if self.log_memory:
            out.update(max_over_ranks(memory_gib(self.device), self.device))
        self.straggler.report(self.flops_per_step * steps, steps)
        return out


def format_timers(step: int, m: dict) -> Optional[str]:
    """The timer line of a logged step, None when no timer ran."""
    parts = []
    for name in TIMERS:
        lo, hi = m.get(f"time_{name}_min_s"), m.get(f"time_{name}_max_s")
        if lo is not None and hi is not None:
            parts.append(f"{name} {lo:.3f}-{hi:.3f}")
    if not parts:
        return None
    return (f"step {step} | seconds, min-max over ranks (per step; eval and save in total): "
            + " | ".join(parts))


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours beyond 24 kept as hours)."""
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_number(value: float) -> str:
    """One decimal from 1 up, three significant digits below (a CPU's 0.000412 TFLOP/s)."""
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"
