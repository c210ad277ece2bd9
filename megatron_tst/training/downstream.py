"""``evaluation.downstream``: lm-evaluation-harness scores of the weights as the run trains.

Every ``interval`` steps (and at the last step with ``at_end``) every rank saves the model
weights, in the run's layout, as a weights-only checkpoint under
``<run_dir>/downstream/step_<N>/weights`` (``checkpoint.save_model_checkpoint``: seconds, no
optimizer state); the logging rank then starts ``python -m megatron_tst.downstream`` on it (a
child process with ``launcher: subprocess``, or a job submitted with ``sbatch`` with ``launcher:
slurm``), which exports it to a Hugging Face directory, runs the tasks and leaves
``results.json`` (or ``failed.json``). Training goes on meanwhile; after every step the logging
rank collects finished evaluations and logs their scores at the step they measured:
``metrics.jsonl`` (``kind: downstream``), wandb (``downstream/<task>/<metric>`` against
``downstream/step``: wandb's own step only grows) and TensorBoard. The end of the run waits for
pending evaluations (at most ``wait_minutes``). Superposition-phase weights predict bags, not
next tokens: they are skipped unless ``superposition: true``. A run that resumes logs the
results of evaluations that finished after it stopped, waits for its Slurm jobs still queued,
and starts again the child processes that ended with the job that started them.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_tst.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

RESULTS, FAILED = "results.json", "failed.json"  # what an evaluation job leaves
LOGGED = "logged"  # marker: the scores are in metrics.jsonl


def check(cfg: RunConfig) -> None:
    """Before the run: lm-evaluation-harness is installed and knows every task."""
    d = cfg.evaluation.downstream
    if not d.interval:
        return
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("needs lm-evaluation-harness: pip install -e '.[eval]'",
                          key="evaluation.downstream.interval", value=d.interval) from None
    if d.include_path and not Path(d.include_path).is_dir():
        raise ConfigError("is not a directory of task YAMLs",
                          key="evaluation.downstream.include_path", value=d.include_path)
    manager = TaskManager(include_path=d.include_path) if d.include_path else TaskManager()
    unknown = [t for t in d.tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-evaluation-harness has no task {', '.join(map(repr, unknown))}; "
                          f"see `lm_eval --tasks list`, or give local task YAMLs with "
                          f"evaluation.downstream.include_path",
                          key="evaluation.downstream.tasks", value=d.tasks)


@dataclass
class Pending:
    step: int
    out: Path
    process: Optional[subprocess.Popen] = None  # subprocess launcher
    job: Optional[str] = None  # slurm launcher


class DownstreamEvals:
    def __init__(self, cfg: RunConfig, is_logging_rank: bool):
        self.cfg, self.d = cfg, cfg.evaluation.downstream
        self.root = Path(cfg.resolved_run_dir) / "downstream"
        self.active = is_logging_rank
        self.pending: list[Pending] = []
        if self.active and self.root.is_dir():
            for out in sorted(self.root.glob("step_*")):
                if not (out / LOGGED).exists():
                    self._resume(out)

    def _resume(self, out: Path) -> None:
        """An evaluation an earlier job of this run started and never logged: its results (or
        failure) are logged; a Slurm job still queued or running is waited for; a child process
        that died with its job is started again on the weights it left."""
        step = int(out.name.split("_")[1])
        job = (out / "slurm_job").read_text().strip() if (out / "slurm_job").is_file() else None
        done = (out / RESULTS).exists() or (out / FAILED).exists()
        if not done and job is None and (out / "weights" / "latest").is_file():
            self._start(step, out, out / "weights")
        else:
            self.pending.append(Pending(step, out, job=job or None))

    @property
    def enabled(self) -> bool:
        return bool(self.d.interval)

    def due(self, step: int, phase: str, last: bool) -> bool:
        """Whether the weights after ``step`` are evaluated (the same on every rank)."""
        if not self.enabled or (phase == "superposition" and not self.d.superposition):
            return False
        return step % self.d.interval == 0 or (last and self.d.at_end)

    def launch(self, step: int, save_weights: Callable[[Path], object]) -> None:
        """Save the weights into a checkpoint root (``save_weights``, a collective: every rank)
        and start their evaluation."""
        out = self.root / f"step_{step:07d}"
        if self.active:  # an earlier attempt at this step (a run resumed from before it)
            for p in self.pending:
                if p.step == step and p.process is not None and p.process.poll() is None:
                    p.process.terminate()
                    p.process.wait()
            self.pending = [p for p in self.pending if p.step != step]
            for name in (RESULTS, FAILED, LOGGED, "slurm_job"):
                (out / name).unlink(missing_ok=True)
        save_weights(out / "weights")  # rank 0 replaces an earlier attempt's weights
        if self.active:
            self._start(step, out, out / "weights")

    def _start(self, step: int, out: Path, weights: Path) -> None:
        device = self.d.device or ("cuda" if self.d.launcher == "slurm" else "cpu")
        dtype = self.d.dtype or ("float32" if device == "cpu" else "bfloat16")
        cmd = [sys.executable, "-m", "megatron_tst.downstream", str(weights), "--out", str(out),
               "--step", str(step), "--tasks", ",".join(self.d.tasks), "--batch-size",
               str(self.d.batch_size), "--device", device, "--dtype", dtype]
        for flag, value in (("--limit", self.d.limit), ("--num-fewshot", self.d.num_fewshot),
                            ("--include-path", self.d.include_path)):
            if value is not None:
                cmd += [flag, str(value)]
        if self.d.launcher == "slurm":
            job = self._submit(cmd, out, step)
            (out / "slurm_job").write_text(job + "\n")
            self.pending.append(Pending(step, out, job=job))
        else:
            env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            if device == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(name, None)
            with open(out / "eval.log", "w") as logf:
                process = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            self.pending.append(Pending(step, out, process=process))
        log.info("step %d: downstream evaluation started (%s) in %s", step, self.d.launcher, out)

    def _submit(self, cmd: list[str], out: Path, step: int) -> str:
        sbatch = ["sbatch", "--parsable", f"--job-name={self.cfg.name}-eval-{step}",
                  f"--output={out / 'eval.log'}", *self.d.slurm_args,
                  f"--wrap={shlex.join(cmd)}"]
        try:
            done = subprocess.run(sbatch, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ConfigError(f"sbatch failed ({err})", key="evaluation.downstream.launcher",
                              value="slurm") from None
        if done.returncode != 0:
            _write_failed(out, step, f"sbatch: {done.stderr.strip()[:500]}")
            return ""
        return done.stdout.strip().split(";")[0]

    def poll(self, metrics, wait: bool = False, beat: Callable[[], None] = lambda: None) -> None:
        """Log the scores of finished evaluations (``wait``: every pending one, at most
        ``wait_minutes``, calling ``beat`` meanwhile: the hang watchdog). The logging rank
        only."""
        if not self.active or not self.pending:
            return
        deadline = time.time() + 60 * self.d.wait_minutes
        while self.pending:
            for p in list(self.pending):
                if self._finished(p):
                    self.pending.remove(p)
                    self._log(p, metrics)
            if not wait or not self.pending:
                return
            if time.time() > deadline:
                steps = ", ".join(str(p.step) for p in self.pending)
                metrics.event(self.pending[-1].step, f"downstream evaluations of steps {steps} "
                              f"still running after {self.d.wait_minutes} min: not waited for "
                              f"(a resumed run logs them)")
                return
            beat()
            time.sleep(1.0)

    def _finished(self, p: Pending) -> bool:
        if (p.out / RESULTS).exists() or (p.out / FAILED).exists():
            if p.process is not None:
                p.process.wait()
            return True
        if p.process is not None and p.process.poll() is not None:
            _write_failed(p.out, p.step, f"the evaluation process ended with status "
                          f"{p.process.returncode} without results (see {p.out / 'eval.log'})")
            return True
        if p.job is not None and p.job and not _in_queue(p.job):
            time.sleep(2)  # the job's last write may still be on its way over the file system
            if not ((p.out / RESULTS).exists() or (p.out / FAILED).exists()):
                _write_failed(p.out, p.step, f"Slurm job {p.job} ended without results (see "
                              f"{p.out / 'eval.log'})")
            return True
        return p.process is None and p.job is None  # found on resume: no results, none coming

    def _log(self, p: Pending, metrics) -> None:
        try:
            results = json.loads((p.out / RESULTS).read_text())
            scores = results["scores"]
            if not isinstance(scores, dict):
                raise ValueError("scores is not an object")
        except FileNotFoundError:
            try:
                error = json.loads((p.out / FAILED).read_text()).get("error", "?")
            except (OSError, ValueError, AttributeError):
                error = "no results"
            metrics.event(p.step, f"downstream evaluation of step {p.step} failed: {error}")
            log.warning("downstream evaluation of step %d failed: %s", p.step, error)
        except (OSError, ValueError, KeyError, TypeError) as err:
            metrics.event(p.step, f"downstream results of step {p.step} are unreadable ({err})")
        else:
            metrics.log_at(p.step, {**scores, "elapsed_s": results.get("elapsed_s")},
                           kind="downstream")
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            log.info("step %d: downstream %s", p.step, shown)
        (p.out / LOGGED).touch()

    def close(self) -> None:
        """Stop child processes still running (an early exit that does not wait)."""
        for p in self.pending:
            if p.process is not None and p.process.poll() is None:
                p.process.terminate()


def _in_queue(job: str) -> bool:
    try:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: assume still running
    return done.returncode == 0 and bool(done.stdout.strip())


def write_json(path: Path, data: dict) -> None:
    """``data`` as ``path``, written under a temporary name and renamed (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _write_failed(out: Path, step: int, error: str) -> None:
    write_json(out / FAILED, {"step": step, "error": error})
