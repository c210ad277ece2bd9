#!/usr/bin/env python3
"""What the Slurm scripts need to know about a run, from the resolved config (never parsed in bash).

    runinfo.py run-dir RECIPE [key=value ...]        absolute run directory (relative to the cwd)
    runinfo.py run-dirs RECIPE [key=value ...]       the run directory and, on a second line,
                                                     the checkpoint directory (both absolute)
    runinfo.py name RECIPE [key=value ...]           the run's name
    runinfo.py phase1-steps RECIPE [key=value ...]   superposition steps of a TST run
                                                     (round(tst.ratio * train_steps) or
                                                     tst.superposition_steps)
    runinfo.py train-steps RECIPE [key=value ...]    training.train_steps
    runinfo.py exit-status RUN_DIR|FILE              "STATUS STEP TRAIN_STEPS SIGNAL CHECKPOINT
                                                     REASON" from RUN_DIR/exit_status.json (or
                                                     FILE), "-" for null or absent; exit 3 if
                                                     missing or unreadable
    runinfo.py latest-step CHECKPOINT_DIR            the step of the checkpoint CHECKPOINT_DIR/latest
                                                     names; 0 when there is none (or it is damaged)
    runinfo.py requeue-state RUN_DIR                 "JOB CRASH_REQUEUES CHECKPOINT_STEP" from
                                                     RUN_DIR/requeue_state.json (train.sbatch's
                                                     record of crash requeues), "none" if absent,
                                                     "damaged WHY" if unreadable (always exit 0)
    runinfo.py requeue-state RUN_DIR JOB N STEP      write it (atomically)

``exit-status``, ``latest-step`` and ``requeue-state`` use the standard library only, so a batch shell outside the training container
can run it with any python3. The others import ``megatron_tst.config`` from this checkout (it needs PyYAML, not torch), so
they also work on a login node where megatron-tst is not installed.
A configuration error prints one line and exits 2, as ``megatron-tst`` does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def _config(argv: list[str]):
    if (REPO / "megatron_tst" / "config").is_dir() and str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if not argv:
        raise SystemExit("runinfo.py: missing RECIPE (a YAML recipe, e.g. configs/demo-cpu.yaml)")
    try:
        from megatron_tst.config import ConfigError, load_config
    except ImportError as err:
        raise SystemExit(f"runinfo.py: cannot import megatron_tst ({err}); run with the python "
                         f"that has megatron-tst installed (set MEGATRON_TST_PYTHON) or "
                         f"pip install -e . in the checkout") from None
    try:
        return load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"megatron-tst: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _exit_status(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("runinfo.py exit-status: expected one argument, the run directory")
    path = Path(argv[0])
    if path.is_dir() or path.suffix != ".json":
        path = path / "exit_status.json"
    try:
        s = json.loads(path.read_text())
        fields = [s["status"], s["step"], s["train_steps"], s.get("signal"), s.get("checkpoint"),
                  s.get("reason")]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"runinfo.py: no readable {path}: {err}", file=sys.stderr)
        return 3
    print(" ".join("-" if f is None else str(f).replace(" ", "_") for f in fields))
    return 0


def _latest_step(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("runinfo.py latest-step: expected one argument, the checkpoint directory")
    try:
        name = (Path(argv[0]) / "latest").read_text().strip()
        step = int(name[len("step_"):]) if name.startswith("step_") else 0
    except (OSError, ValueError):
        step = 0
    print(step)
    return 0


REQUEUE_STATE = "requeue_state.json"


def _requeue_state(argv: list[str]) -> int:
    if len(argv) not in (1, 4):
        raise SystemExit("runinfo.py requeue-state: expected RUN_DIR [JOB N STEP]")
    path = Path(argv[0]) / REQUEUE_STATE
    if len(argv) == 4:
        job, count, step = argv[1], int(argv[2]), int(argv[3])
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps({"job": job, "crash_requeues": count,
                                   "checkpoint_step": step}) + "\n")
        os.replace(tmp, path)
        return 0
    if not path.exists():
        print("none")
        return 0
    try:
        s = json.loads(path.read_text(errors="replace"))
        fields = [str(s["job"]), int(s["crash_requeues"]), int(s["checkpoint_step"])]
        if not fields[0] or " " in fields[0] or fields[1] < 0 or fields[2] < 0:
            raise ValueError("out of range")
    except (OSError, ValueError, KeyError, TypeError) as err:
        print("damaged", f"{path}: {type(err).__name__}: {err}".replace("\n", " "))
        return 0
    print(" ".join(map(str, fields)))
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "exit-status":
        return _exit_status(rest)
    if cmd == "latest-step":
        return _latest_step(rest)
    if cmd == "requeue-state":
        return _requeue_state(rest)
    if cmd not in ("run-dir", "run-dirs", "name", "phase1-steps", "train-steps"):
        raise SystemExit(f"runinfo.py: unknown command {cmd!r}; see runinfo.py --help")
    cfg = _config(rest)
    if cmd == "run-dir":
        print(Path(cfg.resolved_run_dir).resolve())
    elif cmd == "run-dirs":
        print(Path(cfg.resolved_run_dir).resolve())
        print(Path(cfg.checkpoint_dir).resolve())
    elif cmd == "name":
        print(cfg.name)
    elif cmd == "train-steps":
        print(cfg.training.train_steps)
    else:
        from megatron_tst.plan import schedule_for

        sched = schedule_for(cfg)
        if not sched.is_tst or not sched.superposition_steps:
            raise SystemExit(f"runinfo.py: {rest[0]} is not a TST run (tst.bag_size="
                             f"{cfg.tst.bag_size}); there is no superposition phase to split off")
        if sched.superposition_steps >= cfg.training.train_steps:
            raise SystemExit(f"runinfo.py: the superposition phase spans the whole run "
                             f"({sched.superposition_steps} of {cfg.training.train_steps} steps); "
                             f"there is no recovery phase to chain")
        print(sched.superposition_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
