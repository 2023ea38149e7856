"""channels_last and regional torch.compile: training-step speed of the same net side by side.

One process, one fixed batch, fp32: a joint training step (``JointFinetune.training_loss`` +
backward + SGD) of the same task weights in up to three variants: contiguous eager (the CPU
default), channels_last eager (``to_channels_last``, inputs converted), and contiguous compiled
(``RegionsCompiler`` over ``compile_regions()``, the library's ``compile=True``). The variants
alternate step by step and the medians are compared; the eval forward (no grad) is compared for
the memory format too. Compile time is the wall time of the first compiled step minus a
median eager step (inductor compiles in worker processes, so CPU time would miss it).

    python benchmarks/speedups.py --nets demo r50 --compile-nets demo --write

Times are this process's CPU time (``time.process_time``) with one thread: on a CPU shared with
other jobs, wall time measures the neighbours too.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
warnings.filterwarnings("ignore", message=".*self.log.*")

import torch  # noqa: E402

from deft_lightning import JointFinetune  # noqa: E402
from deft_lightning.speedups import RegionsCompiler, images_channels_last, to_channels_last  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
MARKERS = ("<!-- speedups:start -->", "<!-- speedups:end -->")
NETS = {
    "demo": {"label": "demo net: Unet MobileNetV2 (decoder 128..16)", "batch": 8, "size": (128, 256),
             "net": {"arch": "Unet", "encoder_name": "mobilenet_v2",
                     "arch_kwargs": {"decoder_channels": [128, 64, 32, 16, 16]}}},
    "unet": {"label": "Unet MobileNetV2 (smp decoder 256..16)", "batch": 8, "size": (128, 256),
             "net": {"arch": "Unet", "encoder_name": "mobilenet_v2"}},
    "r50": {"label": "DeepLabV3+ ResNet-50 (OS 16)", "batch": 2, "size": (256, 256),
            "net": {"arch": "DeepLabV3Plus", "encoder_name": "resnet50",
                    "arch_kwargs": {"encoder_output_stride": 16, "decoder_atrous_rates": [6, 12, 18]}}},
    # For the test suite: seconds, not minutes.
    "tiny": {"label": "tiny Unet ResNet-18 (depth 3)", "batch": 2, "size": (64, 64),
             "net": {"arch": "Unet", "encoder_name": "resnet18",
                     "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}},
}


class Variant:
    """A task, its optimizer and its input, stepped on the shared batch."""

    def __init__(self, task: JointFinetune, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.task, self.images, self.masks = task.train(), images, masks
        self.optimizer = torch.optim.SGD(task.parameters(), lr=1e-3, momentum=0.9)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.task.training_loss(self.images, self.masks).backward()
        self.optimizer.step()

    @torch.no_grad()
    def forward(self) -> None:
        self.task.eval()
        self.task.net(self.images)
        self.task.train()


def median_times(fns: dict, steps: int, warmup: int) -> dict[str, float]:
    """Median CPU seconds of each function, called in turn after ``warmup`` unmeasured rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + steps):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            if round_ >= warmup:
                times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    setup = NETS[name]
    torch.manual_seed(0)
    base = JointFinetune(**setup["net"], encoder_weights=None)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(setup["batch"], 3, *setup["size"], generator=generator)
    masks = torch.randint(0, 19, (setup["batch"], *setup["size"]), generator=generator)
    plain = Variant(copy.deepcopy(base), images, masks)
    fast = Variant(to_channels_last(copy.deepcopy(base)), images_channels_last(images), masks)
    steps = {"contiguous": plain.step, "channels_last": fast.step}
    result: dict[str, float] = {}
    if name in args.compile_nets:
        compiled = Variant(copy.deepcopy(base), images, masks)
        compiler = RegionsCompiler({"backend": args.compile_backend})
        compiler.compile(compiled.task.compile_regions())
        start = time.perf_counter()
        compiled.step()
        result["first_compiled_step_wall"] = time.perf_counter() - start
        result["fallback"] = compiler.fallback_reason
        steps["compiled"] = compiled.step
    medians = median_times(steps, args.steps, args.warmup)
    forwards = median_times({"contiguous": plain.forward, "channels_last": fast.forward}, args.steps, 1)
    result.update({f"step_{k}": v for k, v in medians.items()})
    result.update({f"forward_{k}": v for k, v in forwards.items()})
    if "compiled" in steps:
        result["compile_seconds"] = result["first_compiled_step_wall"] - medians["contiguous"]
    return result


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    lines = [f"Measured with `{args.command}` on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores, shared with other jobs: load average {os.getloadavg()[0]:.1f} at the "
             f"start), torch {torch.__version__}, fp32, {torch.get_num_threads()} thread, process CPU time, "
             f"medians of {args.steps} alternating steps after {args.warmup} warm-up steps. No GPU in this "
             "session. Absolute times are noisy on this shared machine; the ratios are side by side.", "",
             "| net | batch, size | step contiguous (s) | step channels_last (s) | **contiguous / channels_last** "
             "(step) | eval forward contiguous / channels_last | step compiled (s) | **eager / compiled** | "
             "compile time (s, wall) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.nets:
        setup, r = NETS[name], measure(name, args)
        compiled = ("| - | - | - |" if "step_compiled" not in r else
                    f"| {r['step_compiled']:.3f} | **{r['step_contiguous'] / r['step_compiled']:.2f}** | "
                    f"{r['compile_seconds']:.0f} |" if r["fallback"] is None else
                    f"| fell back: {r['fallback']} | - | - |")
        lines.append(f"| {setup['label']} | {setup['batch']}, {setup['size'][0]}x{setup['size'][1]} | "
                     f"{r['step_contiguous']:.3f} | {r['step_channels_last']:.3f} | "
                     f"**{r['step_contiguous'] / r['step_channels_last']:.2f}** | "
                     f"{r['forward_contiguous'] / r['forward_channels_last']:.2f} " + compiled)
        print(lines[-1], flush=True)
    lines.append("")
    lines.append("Ratios above 1: the channels_last (or compiled) step is faster.")
    return "\n".join(lines)


def write_section(table: str, markers: tuple[str, str] = MARKERS,
                  title: str = "channels_last and torch.compile") -> None:
    """Replace the text between ``markers`` in docs/benchmarks.md (or append a ``title`` section)."""
    start, end = markers
    section = f"{start}\n{table}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (pattern.sub(lambda _: section, text) if pattern.search(text)
            else text.rstrip() + f"\n\n## {title}\n\n{section}\n")
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["demo", "r50"], choices=list(NETS))
    parser.add_argument("--compile-nets", nargs="*", default=[], choices=list(NETS),
                        help="nets also timed compiled (inductor on CPU: minutes per net)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.command = ("python benchmarks/speedups.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    table = run(args)
    print(table)
    if args.write:
        write_section(table)
    return table


if __name__ == "__main__":
    main()
