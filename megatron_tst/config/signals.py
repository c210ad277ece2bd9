"""Signal names as a recipe spells them (``training.exit_signals``): parsed here, where the
config is validated, and used by ``megatron_tst.training.signals`` to install the handlers."""

from __future__ import annotations

import signal


def signal_number(name: str) -> int:
    """``"SIGUSR1"`` or ``"USR1"`` -> its number; ValueError names the valid spellings."""
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    try:
        return int(signal.Signals[key])
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use names such as SIGTERM, SIGUSR1, "
                         f"SIGUSR2, SIGINT") from None
