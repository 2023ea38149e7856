"""FisherTune's costs on the demo net, side by side in one process: score estimation per batch as a
multiple of one training step, the masked update's overhead per step, and peak memory.

    python benchmarks/fishertune.py --steps 3 --write

Net and batch: the demo net (Unet MobileNetV2, decoder channels 128..16), batch 8 at 128x256, as in
``benchmarks/deft_step.py``. Measured, as medians of rounds in which every candidate runs once in
turn (process CPU time by default, robust on a shared machine; one thread):

- ``training step``: zero_grad, forward, pixel CE, backward, SGD step (momentum 0.9, wd 5e-4);
- ``masked training step``: the same plus FisherTune's masked update (the gradient of unselected
  entries zeroed before the step, unselected entries restored after it), 5 % of the encoder kept;
- the Fisher of the encoder on one batch: per-sample (``vmap(grad)``, chunks of 8 and of 2
  images) and micro-batch (1 and 4 images), empirical labels; one variational step;
- ``DR-FIM (direct), per batch``: everything the task computes per estimation batch, i.e. the
  shifted view, the feature shift, and the per-sample Fisher of ``x`` and of ``x'``.

Peak memory: a fresh process per candidate, the kernel's high-water mark (``VmHWM``, reset after
the imports) over the net's build and 2 runs of the candidate, minus the resident set after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from deft_lightning import FisherTune  # noqa: E402
from deft_lightning import fisher  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs/benchmarks.md"
MARKERS = ("<!-- fishertune:start -->", "<!-- fishertune:end -->")
NET = {"arch": "Unet", "encoder_name": "mobilenet_v2", "encoder_weights": None,
       "arch_kwargs": {"decoder_channels": [128, 64, 32, 16, 16]}}
BATCH, SIZE = 8, (128, 256)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def build() -> tuple[FisherTune, torch.optim.Optimizer, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    task = FisherTune(**NET, fraction=0.05, score="random", schedule_steps=100)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, 3, *SIZE, generator=gen)
    labels = torch.randint(0, 19, (BATCH, *SIZE), generator=gen)
    task.masks = fisher.select_entries(task.random_scores(), 0.05)
    task._prepare_masked_update()
    optimizer = torch.optim.SGD(task.param_groups(), lr=1e-3, momentum=0.9)
    return task, optimizer, (images, labels)


def candidates(task: FisherTune, optimizer: torch.optim.Optimizer, batch) -> dict:
    images, labels = batch
    names = [f"encoder.{n}" for n, _ in task.net.encoder.named_parameters()]
    net = task.net

    def step(masked: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        task.training_loss(images, labels).backward()
        if masked:
            task.on_before_optimizer_step(optimizer)
        optimizer.step()
        if masked:
            task.restore_unselected()

    def fisher_of(**kwargs):
        return lambda: fisher.diagonal_fisher(net, [batch], names, **kwargs)

    def variational_step() -> None:
        with fisher.eval_mode(net):
            mean = {n: p.detach() for n, p in net.named_parameters() if n in names}
            fisher.variational_precision(fisher.segmentation_loss(net), mean, [batch], steps=1)

    def dr_fim_direct() -> None:
        task.estimate_ingredients([batch])

    return {
        "training step": lambda: step(False),
        "masked training step": lambda: step(True),
        "Fisher, per-sample vmap, chunks of 8": fisher_of(chunk_size=8),
        "Fisher, per-sample vmap, chunks of 2": fisher_of(chunk_size=2),
        "Fisher, micro-batches of 1 (a backward per image)": fisher_of(estimator="micro_batch", micro_batch_size=1),
        "Fisher, micro-batches of 4": fisher_of(estimator="micro_batch", micro_batch_size=4),
        "variational, one step": variational_step,
        "DR-FIM (direct), per batch": dr_fim_direct,
    }


def alternate(fns: dict, rounds: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            if r >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def memory_probe(name: str, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    baseline = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    task, optimizer, batch = build()
    fn = candidates(task, optimizer, batch)[name]
    for _ in range(2):
        fn()
    return {"peak_above_imports_mib": _status_mib("VmHWM") - baseline}


def measure_memory(name: str, threads: int) -> float:
    command = [sys.executable, __file__, "--memory-probe", name, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_above_imports_mib"]


def run(args: argparse.Namespace) -> str:
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    task, optimizer, batch = build()
    medians = alternate(candidates(task, optimizer, batch), args.steps, args.warmup)
    step = medians["training step"]
    encoder = sum(p.numel() for p in task.net.encoder.parameters())
    kept = sum(int(m.sum()) for m in task.masks.values())
    lines = [f"Measured with `python benchmarks/fishertune.py --steps {args.steps} --warmup {args.warmup}"
             f"{' --clock wall' if args.clock == 'wall' else ''} --write` on {platform.machine()}, {os.cpu_count()} CPU "
             f"cores, torch {torch.__version__}, {args.threads} thread(s), load average {load:.1f} at the start (the "
             f"machine is shared), times are {'process CPU' if args.clock == 'cpu' else 'wall'} time, medians of "
             f"{args.steps} alternating rounds. Demo net (Unet MobileNetV2, decoder 128..16, {encoder:,} encoder "
             f"entries, {kept:,} kept = 5 %), batch {BATCH} at {SIZE[0]}x{SIZE[1]}. No GPU was available.", "",
             "| what | seconds | × training step | peak memory above imports (MiB) |", "|---|---|---|---|"]
    for name, seconds in medians.items():
        memory = measure_memory(name, args.threads) if args.memory else float("nan")
        lines.append(f"| {name} | {seconds:.3f} | **{seconds / step:.2f}** | {memory:.0f} |")
    overhead = medians["masked training step"] / step - 1
    lines += ["", f"Masked-update overhead per step: **{100 * overhead:+.1f} %** (target ≤ 5 %). Per-sample Fisher "
              f"per batch: **{medians['Fisher, per-sample vmap, chunks of 8'] / step:.2f}×** a training step "
              "(target ≤ 3×); a DR-FIM estimate needs it twice (x and x') plus the feature shift."]
    return "\n".join(lines)


def write_section(table: str) -> None:
    start, end = MARKERS
    section = f"## FisherTune\n\n{start}\n{table}\n{end}"
    text = DOC.read_text()
    pattern = re.compile(r"## FisherTune\n\n" + re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--write", action="store_true", help="write the FisherTune section of docs/benchmarks.md")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.threads)))
        return
    table = run(args)
    print(table)
    if args.write:
        write_section(table)


if __name__ == "__main__":
    main()
