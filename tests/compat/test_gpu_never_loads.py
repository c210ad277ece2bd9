"""With CUDA available, apply_cpu_compat() is a no-op: nothing is patched, megatron not imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch.autograd.function import BackwardCFunction

    torch.cuda.is_available = lambda: True  # simulate a GPU machine
    names = ["current_device", "set_device", "Stream", "Event", "stream", "current_stream",
             "default_stream", "set_stream", "synchronize", "get_rng_state", "set_rng_state",
             "manual_seed"]
    before = {n: getattr(torch.cuda, n) for n in names}
    before_random = {n: getattr(torch.cuda.random, n) for n in ["get_rng_state", "manual_seed"]}
    user_fn = BackwardCFunction.apply

    from megatron_tst.compat import apply_cpu_compat, cpu_compat_active

    assert apply_cpu_compat() == [] and apply_cpu_compat(exclude={"cuda_rng"}) == []
    assert not cpu_compat_active()
    assert {n: getattr(torch.cuda, n) for n in names} == before
    assert {n: getattr(torch.cuda.random, n) for n in before_random} == before_random
    assert BackwardCFunction.apply is user_fn
    assert torch._C._len_torch_function_stack() == 0
    assert not [m for m in sys.modules if m.startswith("megatron.")], "megatron was imported"
    print("GPU-SAFE")
    """
)


def test_apply_is_a_no_op_when_cuda_is_available():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0 and "GPU-SAFE" in p.stdout, p.stdout + p.stderr


def test_importing_the_package_changes_nothing():
    """Importing megatron_tst.compat (not calling it) leaves torch untouched even on CPU."""
    script = (
        "import torch; c = torch.cuda.current_device; import megatron_tst.compat as m; "
        "assert torch.cuda.current_device is c and torch._C._len_torch_function_stack() == 0; "
        "assert not m.cpu_compat_active(); print('UNTOUCHED')"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0 and "UNTOUCHED" in p.stdout, p.stdout + p.stderr
