"""Triton-interpreter checks, run in a fresh process: ``TRITON_INTERPRET=1`` must be set before
Triton is first imported (``triton.jit`` picks the interpreter when it decorates, and Triton's own
``tl.zeros`` & co. are decorated at ``import triton``), and another test or library may already
have imported Triton in the pytest process. Prints one JSON object: case -> "ok" or the error."""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from tests.tst.test_linear_loss import _check, _problem, _run  # noqa: E402

CASES = {f"fp32-{kind}-{s}": (s, kind) for s in (1, 4) for kind in ("uniform", "power_law")}


def main() -> None:
    torch.set_num_threads(1)
    out = {}
    for name, (s, kind) in CASES.items():
        try:
            # N, V not multiples of the blocks (16 x 32): masked edges; D=24 spans two D blocks
            h, w, t, c, ref, dh, dw = _problem(37, 70, 24, s, kind, seed=10 + s)
            _check(_run("triton", h, w, t, c, torch.float32), (ref, dh, dw), 2e-5)
            out[name] = "ok"
        except Exception as err:  # noqa: BLE001
            out[name] = repr(err)
    try:  # bf16 inputs, fp32 accumulation: bf16 rounding of inputs and of dz
        h, w, t, c, ref, dh, dw = _problem(20, 48, 16, 4, "power_law", seed=5)
        a = _run("triton", h, w, t, c, torch.bfloat16)
        _check(a, (ref, dh, dw), 3e-2)
        _check(a, _run("chunked", h, w, t, c, torch.bfloat16), 3e-2)
        out["bf16"] = "ok"
    except Exception as err:  # noqa: BLE001
        out["bf16"] = repr(err)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
