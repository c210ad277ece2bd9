"""Signal names as a recipe spells them (``training.exit_signals``): parsed here, where the
config is validated, and used by ``megatron_tst.training.signals`` to install the handlers."""

from __future__ import annotations

import signal


UNCATCHABLE = ("SIGKILL", "SIGSTOP")  # the kernel acts on them: no handler can record them


def signal_number(name: str) -> int:
    """``"SIGUSR1"`` or ``"USR1"`` -> its number; ValueError names the valid spellings (and
    refuses the signals no process can handle)."""
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if key in UNCATCHABLE:
        raise ValueError(f"{name!r} cannot be caught by any process (the kernel kills or stops "
                         f"it at once), so it cannot trigger a save; use SIGTERM or SIGUSR1")
    try:
        return int(signal.Signals[key])
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use names such as SIGTERM, SIGUSR1, "
                         f"SIGUSR2, SIGINT") from None
