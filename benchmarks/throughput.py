"""Images/s and peak memory of a whole Lightning ``fit`` step against a bare PyTorch loop.

For each method (joint, joint + EMA, DeFT stage 2, DAFT, FisherTune) two runs of the same task
class, weights, data and optimizer:

- **Lightning**: ``Trainer.fit`` with the method's own callbacks (EMA, BN conversion, ...), a
  CSV logger, ``self.log`` calls, the datamodule's augmentation (random scale, crop, flip,
  colour jitter, blur), no validation, no checkpoint, no progress bar. A step is the time from
  one ``on_train_batch_end`` to the next: loading and augmenting the batch, the step, the
  callbacks and the logging.
- **Bare loop**: a ``for batch in DataLoader`` loop over the same datamodule's
  ``train_dataloader()``: ``task.training_loss`` on ``task.training_inputs`` (DeFT's LAB-restyled
  copies included) + backward + the task's own optimizer and poly
  schedule (``configure_optimizers``) + what the method adds to a step (``ema_update`` for EMA
  pairs; FisherTune's gradient masking and restore), no Trainer.

Both run in one process and alternate run by run over ``--rounds``; the first ``--warmup`` steps
of each run (BN conversion, FisherTune's scores, first-call costs, compilation) are dropped and
the median step is reported. On the CPU (default) loading is part of the step (``num_workers=0``),
a step's time is this process's CPU time (one thread), and peak memory is measured in a fresh
process per method and kind (one run of ``--warmup`` + 2 steps): the resident set's high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after the imports) above the resident set
after the imports. With ``--device cuda`` a step's time is wall time between CUDA
synchronisations, batches come from ``--workers`` loader processes, and peak memory is
``torch.cuda.max_memory_allocated`` of each run. ``--precision bf16-mixed`` (the bare loop
autocasts its forward as Lightning does), ``--channels-last on|off`` (default: the library's
rule, on for CUDA and CPU) and ``--compile`` (the library's regional ``torch.compile``) apply to both
kinds. DeFT/joint is set beside its arithmetic floor: the sum of the DeFT step's parts over the
joint step's, from the parts table of the DeFT section (``benchmarks/deft_step.py``).

    python benchmarks/throughput.py --write
    python benchmarks/throughput.py --device cuda --net r50 --batch 8 --crop 768 768 --precision bf16-mixed \
        --workers 8 --warmup 5 --steps 20 [--compile]     # the GPU figures of issue 14
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
warnings.filterwarnings("ignore", message=".*self.log.*|.*does not have many workers.*|.*LeafSpec.*"
                        "|.*smaller than the logging interval.*")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedups import NETS, write_section  # noqa: E402

from deft_lightning import DAFT, DeFT, DGSegDataModule, JointFinetune  # noqa: E402
from deft_lightning.callbacks.ema import ema_update  # noqa: E402
from deft_lightning.tasks.fishertune import FisherTune  # noqa: E402

METHODS = {
    "joint": (JointFinetune, {}),
    "joint + EMA": (JointFinetune, {"ema_beta": 0.9999}),
    "DeFT (stage 2)": (DeFT, {"warmup_steps": 0}),
    "DAFT": (DAFT, {"bn_conversion_batches": 1}),
    # Random scores: the scoring runs once before the first step (dropped as warm-up); the
    # masked update, the steady-state cost, is the same for every score.
    "FisherTune (random scores)": (FisherTune, {"score": "random", "estimation_batches": 1}),
}
#: DeFT/joint arithmetic floor: the DeFT step's parts over the joint step's parts, from the parts
#: table of docs/benchmarks.md (DeFT section, `benchmarks/deft_step.py`), seconds summed.
FLOORS = {"demo": (0.401 + 0.385 + 0.709 + 0.008 + 0.004) / (0.408 + 0.577 + 0.009),
          "unet": (0.603 + 0.578 + 1.267 + 0.013 + 0.005) / (0.569 + 0.938 + 0.011),
          "r50": (0.609 + 0.609 + 1.170 + 0.034 + 0.012) / (0.629 + 1.124 + 0.036)}


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


class PeakMemory:
    """Resident-set high-water mark above the resident set at entry (Linux)."""

    def __enter__(self) -> PeakMemory:
        self.start = _proc_status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return self

    def __exit__(self, *exc) -> None:
        self.mib = _proc_status_mib("VmHWM") - self.start


class CudaPeakMemory:
    """``torch.cuda.max_memory_allocated`` over the block, in MiB."""

    def __enter__(self) -> CudaPeakMemory:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.mib = torch.cuda.max_memory_allocated() / 2**20


def clock(args: argparse.Namespace) -> float:
    """Process CPU seconds on the CPU; wall seconds after the queued kernels finished on CUDA."""
    if args.device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def peak_memory_block(args: argparse.Namespace):
    return CudaPeakMemory() if args.device == "cuda" else PeakMemory()


class StepTimes(Callback):
    """Seconds from one ``on_train_batch_end`` to the next (loading + step + callbacks + logs)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = clock(self.args)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        now = clock(self.args)
        self.times.append(now - self._last)
        self._last = now


def batch_and_size(args: argparse.Namespace) -> tuple[int, list[int]]:
    setup = NETS[args.net]
    return args.batch or setup["batch"], list(args.crop or setup["size"])


def build(method: str, args: argparse.Namespace):
    task_class, kwargs = METHODS[method]
    torch.manual_seed(0)
    speed = {"channels_last": {"auto": None, "on": True, "off": False}[args.channels_last],
             "compile": args.compile, "compile_options": {"backend": args.compile_backend}}
    task = task_class(**NETS[args.net]["net"], encoder_weights=None, **speed, **kwargs)
    batch, size = batch_and_size(args)
    data = DGSegDataModule(synthetic_train_size=max(64, batch * (args.warmup + args.steps)),
                           synthetic_image_size=size, crop_size=size, batch_size=batch, seed=0,
                           num_workers=args.workers)
    return task, data


def lightning_run(method: str, args: argparse.Namespace) -> tuple[list[float], float]:
    task, data = build(method, args)
    timer = StepTimes(args)
    with tempfile.TemporaryDirectory() as root, peak_memory_block(args) as memory:
        trainer = Trainer(accelerator=args.device, devices=1, precision=args.precision,
                          max_steps=args.warmup + args.steps, callbacks=[timer],
                          logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                          default_root_dir=root)
        trainer.fit(task, data)
    return timer.times[args.warmup:], memory.mib


def bare_run(method: str, args: argparse.Namespace) -> tuple[list[float], float]:
    """The same step without Lightning: the loop a user would write around the task's parts."""
    task, data = build(method, args)
    device = torch.device(args.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else nullcontext())

    def on_device(batch: dict) -> dict:
        return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in batch.items()}

    with peak_memory_block(args) as memory:
        task.to(device)
        task.configure_speedups(device)
        data.setup("fit")
        task.configure_metrics(data.eval_domains)
        task.hparams.schedule_steps = args.warmup + args.steps  # no trainer to count the steps
        if isinstance(task, DeFT):
            task.ema_betas = task.betas_for(args.warmup + args.steps)
        config = task.configure_optimizers()
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        task.train()
        if isinstance(task, DAFT):  # Algorithm 1 before the first step, as the callback does
            from deft_lightning.callbacks.bn_conversion import convert_bn
            from itertools import islice
            convert_bn(task.net, task.bn_conversion_modules(),
                       (task.input_images(on_device(b)["image"]) for b in islice(data.train_dataloader(), 1)))
        times, last = [], clock(args)
        for step, batch in enumerate(data.train_dataloader()):
            if step == args.warmup + args.steps:
                break
            batch = on_device(batch)
            if isinstance(task, FisherTune):
                task.on_train_batch_start(batch, step)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = task.training_loss(*task.training_inputs(batch))
            loss.backward()
            if isinstance(task, FisherTune):
                task.on_before_optimizer_step(optimizer)
            optimizer.step()
            if isinstance(task, FisherTune):
                task.restore_unselected()
            scheduler.step()
            pairs = task.ema_pairs()
            if pairs:
                ema_update(pairs)
            now = clock(args)
            times.append(now - last)
            last = now
    return times[args.warmup:], memory.mib


RUNNERS = {"lightning": lightning_run, "bare": bare_run}


def peak_memory(method: str, kind: str, args: argparse.Namespace) -> float:
    """MiB above the imports, in a fresh process (see ``--memory-probe``; CPU runs)."""
    command = [sys.executable, __file__, "--memory-probe", method, kind, "--net", args.net,
               "--warmup", str(args.warmup), "--steps", "2", "--threads", str(args.threads),
               "--precision", args.precision, "--channels-last", args.channels_last, "--workers", str(args.workers),
               *(["--batch", str(args.batch)] if args.batch else []),
               *(["--crop", *map(str, args.crop)] if args.crop else []),
               *(["--compile", "--compile-backend", args.compile_backend] if args.compile else [])]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    setup = NETS[args.net]
    load = os.getloadavg()[0]
    steps: dict[tuple[str, str], list[float]] = {}
    in_run_memory: dict[tuple[str, str], float] = {}  # the GPU's peak; on the CPU a fresh process measures it
    for round_ in range(args.rounds):
        for method in args.methods:
            for kind, runner in RUNNERS.items():
                times, mib = runner(method, args)
                steps.setdefault((method, kind), []).extend(times)
                in_run_memory[(method, kind)] = max(mib, in_run_memory.get((method, kind), 0.0))
    if args.device == "cuda":
        memory = in_run_memory
    else:
        memory = {(method, kind): peak_memory(method, kind, args) if args.memory else float("nan")
                  for method in args.methods for kind in RUNNERS}
    median = {key: statistics.median(values) for key, values in steps.items()}
    batch, size = batch_and_size(args)
    cuda = args.device == "cuda"
    hardware = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores" if cuda
                else f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores shared with other jobs, "
                     f"load average {load:.1f} at the start), no GPU")
    channels_last = {"auto": "channels_last (the library's default)",
                     "on": "channels_last", "off": "contiguous"}[args.channels_last]
    lines = [f"Measured with `{args.command}` on {hardware}, torch {torch.__version__}, {args.precision}, "
             f"{channels_last}, {'regional torch.compile (' + args.compile_backend + ')' if args.compile else 'eager'}, "
             f"{torch.get_num_threads()} CPU thread(s), `num_workers={args.workers}`. Net: {setup['label']}, batch "
             f"{batch}, crop {size[0]}x{size[1]} from synthetic images of that size, augmentation on. Medians of "
             f"{args.rounds} x {args.steps} steps ({'wall time, CUDA-synchronised' if cuda else 'process CPU time'}) "
             f"after {args.warmup} warm-up steps per run; runs alternate. Peak memory: "
             f"{'torch.cuda.max_memory_allocated' if cuda else 'resident set above the imports'}."
             + ("" if cuda else " Absolute figures are noisy on this shared machine."), "",
             "| method | Lightning (images/s) | bare loop (images/s) | **Lightning / bare (step time)** | "
             "peak memory Lightning (MiB) | peak memory bare (MiB) |", "|---|---|---|---|---|---|"]
    for method in args.methods:
        fit, bare = median[(method, "lightning")], median[(method, "bare")]
        lines.append(f"| {method} | {batch / fit:.2f} | {batch / bare:.2f} | **{fit / bare:.3f}** | "
                     f"{memory[(method, 'lightning')]:.0f} | {memory[(method, 'bare')]:.0f} |")
    deft, joint = "DeFT (stage 2)", "joint"
    if deft in args.methods and joint in args.methods:
        task_class, kwargs = METHODS[deft]  # does DeFT's step append a LAB-restyled copy of the batch?
        restyled = kwargs.get("style_augmentation", inspect.signature(task_class).parameters["style_augmentation"].default)
        floor = (f"arithmetic floor from the parts table {FLOORS[args.net]:.2f} for the same images"
                 + (f", {2 * FLOORS[args.net]:.2f} for DeFT's step on the batch and its LAB-restyled copy "
                    "(twice the images of the joint step; the restyling itself not counted)." if restyled else ".")
                 if args.net in FLOORS else "no parts table for this net.")
        lines += ["", f"DeFT / joint step time: **{median[(deft, 'lightning')] / median[(joint, 'lightning')]:.2f}** "
                  f"with Lightning, {median[(deft, 'bare')] / median[(joint, 'bare')]:.2f} in the bare loop; " + floor]
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="demo", choices=list(NETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="dropped steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per method and kind, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile", action="store_true", help="the library's regional torch.compile")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--batch", type=int, help="batch size (default: the net's in speedups.NETS)")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="crop and image size")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs (CPU)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "KIND"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.memory_probe:
        torch.set_num_threads(args.threads)
        method, kind = args.memory_probe
        print(json.dumps({"peak_mib": RUNNERS[kind](method, args)[1]}))
        return ""
    args.command = ("python benchmarks/throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    table = run(args)
    if args.write:
        kind = "" if args.device == "cpu" else "-gpu-compiled" if args.compile else "-gpu"
        write_section(table, (f"<!-- throughput{kind}:start -->", f"<!-- throughput{kind}:end -->"),
                      "A whole Lightning step against a bare PyTorch loop"
                      + {"": "", "-gpu": " (GPU, eager)", "-gpu-compiled": " (GPU, compiled)"}[kind])
    return table


if __name__ == "__main__":
    main()
