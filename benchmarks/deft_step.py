"""DeFT stage-2 step vs joint step: time, where the time goes, EMA cost, peak memory, bf16.

Plain PyTorch loops around the tasks' own code (no Trainer): a joint step is
``JointFinetune.training_loss`` + backward + SGD step; a DeFT step is ``DeFT.training_loss``
(both pathways) + backward + SGD step + ``ema_update(task.ema_pairs())``. Both run on the same
batch, alternating joint/DeFT step by step, and the medians are compared. The EMA update is timed
as the fused foreach lerp the library uses and as the per-parameter ``mul_/add_`` loop of the
authors' code. Peak memory is measured per method in a fresh subprocess (see ``memory_probe``).
The table goes between the DeFT markers of docs/benchmarks.md with ``--write``.

    python benchmarks/deft_step.py --write

Times are the process's CPU time by default (``--clock``): on a CPU shared with other jobs wall
time measures the neighbours as much as the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
warnings.filterwarnings("ignore", message=".*self.log.*")

import torch  # noqa: E402

from deft_lightning import DeFT, JointFinetune  # noqa: E402
from deft_lightning.callbacks.ema import ema_update  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
MARKERS = ("<!-- deft:start -->", "<!-- deft:end -->")
SETUPS = {
    "r50": {"label": "DeepLabV3+ ResNet-50 (OS 16), batch 2, 256x256", "batch": 2, "size": (256, 256),
            "net": {"arch": "DeepLabV3Plus", "encoder_name": "resnet50",
                    "arch_kwargs": {"encoder_output_stride": 16, "decoder_atrous_rates": [6, 12, 18]}}},
    "unet": {"label": "Unet MobileNetV2 (smp decoder 256..16), batch 8, 128x256", "batch": 8, "size": (128, 256),
             "net": {"arch": "Unet", "encoder_name": "mobilenet_v2"}},
    # The demo net of configs/trainer/demo.yaml: the lighter Unet decoder.
    "demo": {"label": "demo net: Unet MobileNetV2 (decoder 128..16), batch 8, 128x256", "batch": 8,
             "size": (128, 256), "net": {"arch": "Unet", "encoder_name": "mobilenet_v2",
                                         "arch_kwargs": {"decoder_channels": [128, 64, 32, 16, 16]}}},
}


def build(method: str, setup: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    common = dict(**setup["net"], encoder_weights=None, lr=1e-2, weight_decay=5e-4, momentum=0.9)
    task = JointFinetune(**common) if method == "joint" else DeFT(**common, warmup_steps=0)
    optimizer = torch.optim.SGD([g for g in task.param_groups() if g["params"]], lr=1e-2, momentum=0.9)
    return task.train(), optimizer


def batch(setup: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(setup["batch"], 3, *setup["size"], generator=generator)
    masks = torch.randint(0, 19, (setup["batch"], *setup["size"]), generator=generator)
    return images, masks


def train_step(task, optimizer, images, masks, autocast: bool = False) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = task.training_loss(images, masks)
    loss.backward()
    optimizer.step()
    pairs = task.ema_pairs()
    if pairs:
        ema_update(pairs)


#: ``cpu``: CPU time of this process (all its threads), robust on a machine shared with other jobs
#: (with one thread it equals the wall time of an idle machine); ``wall``: elapsed time.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def timed(fn, *args, **kwargs) -> float:
    start = clock()
    fn(*args, **kwargs)
    return clock() - start


def alternate(fns: dict, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, called in turn step by step after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for step in range(warmup + steps):
        for name, fn in fns.items():
            elapsed = timed(fn)
            if step >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def step_breakdown(task, optimizer, images, masks, steps: int) -> dict[str, float]:
    """Median seconds of each part of a step: for DeFT the two pathways of ``DeFT.training_loss``."""
    criterion, deft = task.criterion, isinstance(task, DeFT)
    forwards = ({"pathway 1 forward (e1 → d~1)": ("adaptive_encoder", "retentive_decoder"),
                 "pathway 2 forward (e~2, no graph → d2)": ("retentive_encoder", "adaptive_decoder")}
                if deft else {"forward": None})
    parts: dict[str, list[float]] = {k: [] for k in [*forwards, "backward", "optimizer step", "EMA update"]}
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for name, pair in forwards.items():
            start = clock()
            losses.append(criterion((task.pair(*pair) if pair else task.net)(images), masks))
            parts[name].append(clock() - start)
        parts["backward"].append(timed(sum(losses).backward))
        parts["optimizer step"].append(timed(optimizer.step))
        parts["EMA update"].append(timed(ema_update, task.ema_pairs()))
    return {name: statistics.median(values) for name, values in parts.items()}


def per_parameter_ema(pairs) -> None:
    """The authors' loop: ``target.mul_(β).add_(source, alpha=1 − β)`` parameter by parameter."""
    with torch.no_grad():
        for pair in pairs:
            for target, source in zip(pair.target.parameters(), pair.source.parameters()):
                target.mul_(pair.beta).add_(source, alpha=1 - pair.beta)


def memory_probe(method: str, setup_name: str, steps: int, threads: int) -> dict[str, float]:
    """In a fresh process: resident set after imports, then its peak over build + ``steps`` steps.

    The peak is the kernel's high-water mark of this process image (``VmHWM``), reset after the
    imports through ``/proc/self/clear_refs``; ``ru_maxrss`` would not do: it carries the parent's
    resident set over from ``fork`` across ``exec``.
    """
    torch.set_num_threads(threads)
    baseline = _proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident set
    task, optimizer = build(method, SETUPS[setup_name])
    images, masks = batch(SETUPS[setup_name])
    for _ in range(steps):
        train_step(task, optimizer, images, masks)
    params = sum(p.numel() for p in task.parameters()) * 4 / 2**20
    peak = _proc_status_mib("VmHWM")
    return {"baseline_mib": baseline, "peak_mib": peak, "training_mib": peak - baseline, "weights_mib": params}


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def measure_memory(method: str, setup_name: str, steps: int, threads: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--memory-probe", method, setup_name, "--memory-steps", str(steps),
               "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [f"Measured with `{args.command}` on {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"load average {os.getloadavg()[0]:.1f} at the start (the machine is shared), times are "
             f"{'process CPU time' if args.clock == 'cpu' else 'wall-clock time'}. No GPU was available in "
             "this session. Medians over alternating steps after warm-up steps.", ""]
    lines += ["| net | joint step (s) | DeFT stage-2 step (s) | DeFT / joint | EMA fused (ms) | EMA per-param loop (ms) "
              "| EMA fused / DeFT step | peak memory DeFT / joint |", "|---|---|---|---|---|---|---|---|"]
    breakdowns, memories = {}, {}
    for name in args.setups:
        setup = SETUPS[name]
        images, masks = batch(setup)
        joint, joint_optimizer = build("joint", setup)
        deft, deft_optimizer = build("deft", setup)
        medians = alternate({"joint": lambda: train_step(joint, joint_optimizer, images, masks),
                             "deft": lambda: train_step(deft, deft_optimizer, images, masks)},
                            args.steps, args.warmup)
        pairs = deft.ema_pairs()
        ema = alternate({"fused": lambda: ema_update(pairs), "loop": lambda: per_parameter_ema(pairs)},
                        args.ema_reps, 2)
        breakdowns[name] = {"joint": step_breakdown(joint, joint_optimizer, images, masks, args.steps),
                            "deft": step_breakdown(deft, deft_optimizer, images, masks, args.steps)}
        memories[name] = {m: measure_memory(m, name, args.memory_steps, args.threads) for m in ("joint", "deft")}
        memory_ratio = memories[name]["deft"]["training_mib"] / memories[name]["joint"]["training_mib"]
        lines.append(f"| {setup['label']} | {medians['joint']:.3f} | {medians['deft']:.3f} | "
                     f"**{medians['deft'] / medians['joint']:.2f}** | {1e3 * ema['fused']:.1f} | "
                     f"{1e3 * ema['loop']:.1f} | {100 * ema['fused'] / medians['deft']:.1f} % | "
                     f"**{memory_ratio:.2f}** |")
        print(lines[-1], flush=True)
    lines += ["", "Where the time goes (medians, seconds; the parts timed one by one):", "",
              "| net | method | part | seconds | share of the joint step |", "|---|---|---|---|---|"]
    for name in args.setups:
        joint_total = sum(breakdowns[name]["joint"].values())
        for method in ("joint", "deft"):
            for part, seconds in breakdowns[name][method].items():
                lines.append(f"| {SETUPS[name]['label']} | {method} | {part} | {seconds:.3f} | "
                             f"{100 * seconds / joint_total:.0f} % |")
    lines += ["", "Peak memory (MiB; resident set of a fresh process per method: peak over model build + "
              f"{args.memory_steps} steps (VmHWM) minus the resident set after imports; weights = fp32 parameter bytes):", "",
              "| net | method | weights | training peak above imports |", "|---|---|---|---|"]
    for name in args.setups:
        for method in ("joint", "deft"):
            m = memories[name][method]
            lines.append(f"| {SETUPS[name]['label']} | {method} | {m['weights_mib']:.0f} | {m['training_mib']:.0f} |")
    if args.bf16:
        setup = SETUPS["demo"]
        images, masks = batch(setup)
        fp32, fp32_optimizer = build("joint", setup)
        bf16, bf16_optimizer = build("joint", setup)
        medians = alternate({"fp32": lambda: train_step(fp32, fp32_optimizer, images, masks),
                             "bf16": lambda: train_step(bf16, bf16_optimizer, images, masks, autocast=True)},
                            args.bf16_steps, 1)
        lines += ["", f"bf16-mixed autocast vs fp32, joint step, {setup['label']}: fp32 {medians['fp32']:.3f} s, "
                  f"bf16 {medians['bf16']:.3f} s (medians of {args.bf16_steps} alternating steps), **fp32 / bf16 = {medians['fp32'] / medians['bf16']:.2f}** "
                  "(above 1: bf16 faster)."]
    return "\n".join(lines)


def write_section(table: str) -> None:
    start, end = MARKERS
    section = f"## DeFT\n\n{start}\n{table}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(r"## DeFT\n\n" + re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=7, help="measured steps per method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu", help="what a time is (see CLOCKS)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--ema-reps", type=int, default=20)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--bf16-steps", type=int, default=3, help="measured steps of the bf16/fp32 comparison")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "SETUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, args.memory_steps, args.threads)))
        return
    args.command = "python benchmarks/deft_step.py " + shlex.join(sys.argv[1:])
    table = run(args)
    print(table)
    if args.write:
        write_section(table)


if __name__ == "__main__":
    main()
