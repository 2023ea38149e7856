"""bf16-mixed where the hardware runs it fast, fp32 elsewhere (``--precision_by_hardware true``,
set by ``configs/trainer/auto.yaml``).

bf16 autocast pays only with native bf16 arithmetic: a GPU that supports bf16 (CUDA compute
capability 8.0+, ``torch.cuda.is_bf16_supported(including_emulation=False)``) or a CPU with AMX
(``amx_bf16``) or AVX512-BF16 (``avx512_bf16``) instructions. Without them it is emulated:
20x *slower* than fp32 for an smp Unet step on a 2-core AMD EPYC (docs/benchmarks.md), against
1.6x faster on an AMX CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: CPU flags (as /proc/cpuinfo names them) of native bf16 arithmetic.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); elsewhere the bf16 ones torch detects."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    detected = {"amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)(),
                "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()}
    return {flag for flag, present in detected.items() if present}


def cuda_bf16_native() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def training_device(accelerator: str) -> str:
    """``"cuda"``, ``"cpu"`` or ``"other"`` for a Trainer ``accelerator`` value."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available()):
        return "cpu"
    return "other"


def precision_for_hardware(accelerator: str = "auto") -> tuple[str, str]:
    """``("bf16-mixed" | "32-true", reason)`` for the device ``accelerator`` trains on."""
    device = training_device(str(accelerator))
    if device == "cuda":
        if cuda_bf16_native():
            return "bf16-mixed", f"{torch.cuda.get_device_name()} supports bf16"
        return "32-true", "this GPU has no native bf16"
    if device == "cpu":
        found = sorted(set(CPU_BF16_FLAGS) & cpu_flags())
        if found:
            return "bf16-mixed", f"the CPU has {'/'.join(found)}"
        return "32-true", f"the CPU has none of {'/'.join(CPU_BF16_FLAGS)}: bf16 would be emulated"
    return "32-true", f"bf16 is only chosen on CUDA GPUs and CPUs (accelerator {accelerator!r})"
