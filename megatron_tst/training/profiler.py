"""``training.profile``: a torch.profiler trace of some training steps, one file per profiled rank.

The trainer calls ``begin(step, phase)`` before each step and ``end(step)`` once it is counted;
the profiler starts at the first step of ``start_step..end_step`` this job runs (a resumed job
profiles only the steps it runs), labels each step with its number and TST phase, and after
``end_step`` writes ``<run_dir>/profile/rank<r>-steps<a>-<b>.json`` (chrome trace JSON: open it in
https://ui.perfetto.dev or chrome://tracing), where ``a..b`` are the steps it saw. ``close()``
stops a profiler the run left running (it ended early: a signal, ``training.exit_at_step``, a
non-finite stop) and writes what was recorded. CUDA kernels are recorded when CUDA is present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_tst.config.schema import ProfileConfig
from megatron_tst.tst.schedule import Phase


class StepProfiler:
    def __init__(self, profile: ProfileConfig, rank: int, run_dir: Path):
        """``profile.ranks`` are checked against the world size by ``validate_layout``."""
        self.start_step, self.end_step = profile.start_step, profile.end_step
        self.rank, self.out_dir = rank, Path(run_dir) / "profile"
        self.enabled = self.start_step is not None and rank in profile.ranks
        self._prof = None
        self._range = None  # the open record_function of the current step
        self._first = self._last = None  # the steps the profiler saw

    def begin(self, step: int, phase: Phase) -> None:
        """Before ``step`` (1-based) runs."""
        if not self.enabled or not self.start_step <= step <= self.end_step:
            return
        if self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()
            self._first = step
        self._last = step
        self._range = torch.profiler.record_function(
            f"train step {step} ({phase.name}, s={phase.bag_size})")
        self._range.__enter__()

    def end(self, step: int) -> Optional[Path]:
        """After ``step`` is counted: the trace's path once ``end_step`` is done, else None."""
        self._close_range()
        if self._prof is not None and step >= self.end_step:
            return self._write()
        return None

    def close(self) -> Optional[Path]:
        """At the end of the run: write the trace of a profile the run ended in (else None)."""
        self._close_range()
        return self._write() if self._prof is not None else None

    def _close_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def _write(self) -> Path:
        prof, self._prof, self.enabled = self._prof, None, False  # once per run
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{self.rank}-steps{self._first}-{self._last}.json"
        prof.export_chrome_trace(str(path))
        return path
