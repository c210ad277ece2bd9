"""A TorchFunctionMode that runs megatron-core's CUDA-only tensor code on the CPU.

megatron-core allocates with ``device="cuda"``, ``device=torch.cuda.current_device()`` (an int,
which torch reads as a CUDA index) and ``Tensor.cuda()``, and checks ``param.type() ==
'torch.cuda.FloatTensor'``. One mode, pushed once and never popped, rewrites those calls; each
behaviour is switched on by its own patch, so a test can leave any one of them off.

torch keeps the mode stack per thread: the mode covers the thread that applied the layer and, via
``run_backward_under_mode``, custom autograd backward functions. Tensor/module hooks and other
threads do not see it. It also moves the project's own ``cuda`` requests to the CPU.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_RETURN_SELF = (torch.Tensor.cuda, torch.Tensor.pin_memory)  # already on the (unpinned) CPU


def to_cpu_device(device):
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, an int) to cpu."""
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str):
        return _CPU if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    return device


class CpuCompatMode(TorchFunctionMode):
    map_devices = False
    report_cuda_types = False
    ignore_record_stream = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.map_devices:
            if func in _RETURN_SELF:
                return args[0]
            if "device" in kwargs:
                kwargs["device"] = to_cpu_device(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is torch.Tensor.to and len(args) > 1:
                args = (args[0], to_cpu_device(args[1]), *args[2:])
        if self.report_cuda_types and func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(args[0])  # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor'
            return "torch.cuda." + name[len("torch."):] if args[0].device.type == "cpu" else name
        if self.ignore_record_stream and func is torch.Tensor.record_stream:
            return None
        return func(*args, **kwargs)


_MODE: CpuCompatMode | None = None


def mode() -> CpuCompatMode:
    """The process-wide mode, pushed (and never popped) on first use."""
    global _MODE
    if _MODE is None:
        _MODE = CpuCompatMode()
        _MODE.__enter__()
    return _MODE


def map_cuda_devices() -> None:
    """megatron allocates on CUDA unconditionally: DDP ``param_and_grad_buffer``, the schedules'
    ``total_num_tokens``, p2p buffers, ``GlobalMemoryBuffer``, ``tensor_parallel.mappings``, RoPE
    ``inv_freq``, MoE. Map ``device=`` arguments and ``Tensor.to`` targets to cpu, make
    ``Tensor.cuda()``/``pin_memory()`` return the tensor and drop ``pin_memory=True``."""
    mode().map_devices = True


def report_cuda_type_names() -> None:
    """``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer`` and
    ``clip_grad_by_total_norm_fp32`` accept only ``Tensor.type()`` in
    ``torch.cuda.{Float,Half,BFloat16}Tensor``: CPU tensors report those names."""
    mode().report_cuda_types = True


def ignore_record_stream() -> None:
    """``Tensor.record_stream`` (MoE dispatcher) has no CPU kernel; with no streams it is moot."""
    mode().ignore_record_stream = True


def _on_stack(m: TorchFunctionMode) -> bool:
    return any(
        torch._C._get_function_stack_at(i) is m
        for i in range(torch._C._len_torch_function_stack())
    )


def run_backward_under_mode() -> None:
    """torch runs ``autograd.Function.backward`` (called back from ``loss.backward()``) with the
    mode stashed, and megatron's backward functions allocate on ``current_device()`` too
    (``tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication`` with SP,
    ``mappings._AllToAll`` for MoE): run every custom backward under the mode."""
    from torch.autograd.function import BackwardCFunction

    m = mode()

    def wrap(original):
        def under_mode(self, *args):
            if _on_stack(m):
                return original(self, *args)
            with m:
                return original(self, *args)

        return under_mode

    for name in ("apply", "apply_boxed"):  # apply_boxed exists from torch 2.13
        if name in vars(BackwardCFunction):
            setattr(BackwardCFunction, name, wrap(vars(BackwardCFunction)[name]))
