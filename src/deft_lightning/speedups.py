"""Step speed-ups a task switches on: the ``channels_last`` memory format and regional
``torch.compile``.

**channels_last** (NHWC) lets cuDNN and oneDNN pick their fastest convolution kernels. It is
standard on GPUs, and on CPUs it made the training step 1.09-1.34x as fast (docs/benchmarks.md:
a 2-core AMD EPYC in fp32, three nets, measured side by side on an idle machine; 1.26x on an
AMX CPU in bf16). So the default, ``channels_last=None``, turns it on for CUDA and CPU devices
(other backends keep the contiguous format); ``True``/``False`` force it.
:func:`to_channels_last` converts every 4-D parameter and buffer of a module (all of a task's
nets: DeFT's four components, EMA copies); the tasks convert their input images too.

**Regional compilation** compiles each encoder and each decoder on its own
(:func:`compile_regions`, ``nn.Module.compile``: parameter names and checkpoints are
unchanged) rather than the whole task. If compilation fails (no C++ compiler or Triton,
an operator the backend cannot lower), every region falls back to eager mode with one
warning and training goes on. The backward graph is compiled together with the forward one
(``force_non_lazy_backward_lowering``), so its failures surface in the same place.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """The memory format a task trains in: ``requested`` if set, else on for CUDA and CPU devices."""
    return device.type in ("cuda", "cpu") if requested is None else requested


def to_channels_last(module: nn.Module) -> nn.Module:
    """Every 4-D parameter and buffer of ``module`` in channels_last, in place (same tensors'
    identity, so an optimizer built before or after sees the same parameters)."""
    return module.to(memory_format=torch.channels_last)


def images_channels_last(images: torch.Tensor) -> torch.Tensor:
    """A 4-D image batch in channels_last (other tensors unchanged)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


class RegionsCompiler:
    """Compiles modules one by one with ``torch.compile`` and falls back to eager on failure.

    Args:
        options: keyword arguments of ``torch.compile`` (``mode``, ``backend``, ``dynamic``...).

    ``fallback_reason`` is set (and warned once) when compilation failed; ``compile_seconds``
    sums the wall time of the calls that compiled (the first call of each region and shape).
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self.modules: list[nn.Module] = []
        self.fallback_reason: str | None = None
        self.compile_seconds = 0.0

    def compile(self, modules: Sequence[nn.Module]) -> None:
        if not torch._dynamo.is_dynamo_supported():
            self._fall_back("torch.compile is not supported on this platform/Python")
            return
        torch._functorch.config.force_non_lazy_backward_lowering = True
        for module in modules:
            if module in self.modules:
                continue
            module.compile(**self.options)
            module._compiled_call_impl = self._guarded(module, module._compiled_call_impl)
            self.modules.append(module)

    def _guarded(self, module: nn.Module, compiled: Callable) -> Callable:
        frames_before = [0]

        def call(*args: Any, **kwargs: Any) -> Any:
            counters = torch._dynamo.utils.counters["stats"]
            frames_before[0] = counters["unique_graphs"]
            start = time.perf_counter()
            try:
                output = compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:
                self._fall_back(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                return module(*args, **kwargs)
            if counters["unique_graphs"] != frames_before[0]:
                self.compile_seconds += time.perf_counter() - start
            return output

        return call

    def _fall_back(self, reason: str) -> None:
        for module in self.modules:
            module._compiled_call_impl = None
        self.fallback_reason = reason
        warnings.warn(f"compile=True: torch.compile failed ({reason}); training continues in eager mode",
                      RuntimeWarning, stacklevel=3)

    def report(self) -> None:
        if self.modules and self.fallback_reason is None:
            rank_zero_info(f"compile=True: {len(self.modules)} regions compiled, "
                           f"{self.compile_seconds:.1f} s spent compiling so far")
