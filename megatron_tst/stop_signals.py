"""The signals that stop a job, and the helper processes that must survive them.

Schedulers and launchers stop a job with these signals, and Slurm sends them to every process of
a job step: megatron's checkpoint helper processes (the persistent writer of background saves on
the CPU, the process that carries write results back) must ignore them, or a signal would break
the save the trainer finishes before it exits. Used by ``training`` (which starts the helpers)
and ``compat`` (the writer's entry point on the CPU). No torch here: unpickling
``ignore_stop_signals`` is all that the results-queue process imports (an import of torch
there cost every run with checkpoints two seconds at its start).
"""

from __future__ import annotations

import contextlib
import signal
import threading

# What schedulers and launchers send to stop a job (Slurm signals every process of a job step).
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")


@contextlib.contextmanager
def stop_signals_ignored_by_new_processes():
    """Processes started inside ignore ``STOP_SIGNALS`` from their first instruction: an
    ignored disposition survives ``fork`` and ``exec`` (a handler does not), and
    ``ignore_stop_signals`` in the child comes only after its imports (seconds), during which a
    signal to every process of the job would kill it. This process's own handlers are set back
    after (milliseconds: the start of the process). The signals are blocked in this thread
    meanwhile, so one sent then waits for the handlers if it is this thread's, but one that
    another thread takes (the process has others: gloo's) is ignored: the trainer starts these
    processes in its set-up, before any step, where a signal lost costs what one during its
    imports does (no checkpoint; the run resumes from the one it started from). Only the main
    thread can change handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = {getattr(signal, name) for name in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def ignore_stop_signals() -> None:
    """In a process megatron's checkpoint writer spawns (the persistent writer; the process
    that carries write results back, on GPUs too): ignore ``STOP_SIGNALS``. Spawned, it keeps
    neither the trainer's handlers nor its block of the exit signals, so a signal to every
    process of the job would kill it and break the save the trainer finishes before it exits.
    These processes end as megatron ends them (a message, or SIGKILL after a failure)."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
