"""Images/s and peak memory of a whole Lightning ``fit`` step against a bare PyTorch loop.

For each method (joint, joint + EMA, DeFT stage 2, DAFT, FisherTune) two runs of the same task
class, weights, data and optimizer:

- **Lightning**: ``Trainer.fit`` with the method's own callbacks (EMA, BN conversion, ...), a
  CSV logger, ``self.log`` calls, the datamodule's augmentation (random scale, crop, flip,
  colour jitter, blur), no validation, no checkpoint, no progress bar. A step is the time from
  one ``on_train_batch_end`` to the next: loading and augmenting the batch, the step, the
  callbacks and the logging.
- **Bare loop**: a ``for batch in DataLoader`` loop over the same datamodule's
  ``train_dataloader()``: ``task.training_loss`` + backward + the task's own optimizer and poly
  schedule (``configure_optimizers``) + what the method adds to a step (``ema_update`` for EMA
  pairs; FisherTune's gradient masking and restore), no Trainer.

Both run in one process with ``num_workers=0`` (loading is part of the step) and alternate run
by run over ``--rounds``; a step's time is this process's CPU time (one thread), the first
``--warmup`` steps of each run (BN conversion, FisherTune's scores, first-call costs) are
dropped, and the median is reported. Peak memory is measured in a fresh process per method and
kind (one run of ``--warmup`` + 2 steps): the resident set's high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs`` after the imports) above the resident set after the imports. DeFT/joint is set beside its arithmetic floor: the sum of the DeFT step's parts over
the joint step's, from the parts table of the DeFT section (``benchmarks/deft_step.py``).

    python benchmarks/throughput.py --write
"""

from __future__ import annotations

import argparse
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

MARKERS = ("<!-- throughput:start -->", "<!-- throughput:end -->")
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


class StepTimes(Callback):
    """CPU seconds from one ``on_train_batch_end`` to the next (loading + step + callbacks + logs)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        now = time.process_time()
        self.times.append(now - self._last)
        self._last = now


def build(method: str, args: argparse.Namespace):
    task_class, kwargs = METHODS[method]
    torch.manual_seed(0)
    task = task_class(**NETS[args.net]["net"], encoder_weights=None, **kwargs)
    setup = NETS[args.net]
    size = list(setup["size"])
    data = DGSegDataModule(synthetic_train_size=max(64, setup["batch"] * (args.warmup + args.steps)),
                           synthetic_image_size=size, crop_size=size, batch_size=setup["batch"], seed=0)
    return task, data


def lightning_run(method: str, args: argparse.Namespace) -> tuple[list[float], float]:
    task, data = build(method, args)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as root, PeakMemory() as memory:
        trainer = Trainer(accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, callbacks=[timer],
                          logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                          default_root_dir=root)
        trainer.fit(task, data)
    return timer.times[args.warmup:], memory.mib


def bare_run(method: str, args: argparse.Namespace) -> tuple[list[float], float]:
    task, data = build(method, args)
    with PeakMemory() as memory:
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
                       (b["image"] for b in islice(data.train_dataloader(), 1)))
        times, last = [], time.process_time()
        for step, batch in enumerate(data.train_dataloader()):
            if step == args.warmup + args.steps:
                break
            if isinstance(task, FisherTune):
                task.on_train_batch_start(batch, step)
            optimizer.zero_grad(set_to_none=True)
            task.training_loss(batch["image"], batch["mask"]).backward()
            if isinstance(task, FisherTune):
                task.on_before_optimizer_step(optimizer)
            optimizer.step()
            if isinstance(task, FisherTune):
                task.restore_unselected()
            scheduler.step()
            pairs = task.ema_pairs()
            if pairs:
                ema_update(pairs)
            now = time.process_time()
            times.append(now - last)
            last = now
    return times[args.warmup:], memory.mib


RUNNERS = {"lightning": lightning_run, "bare": bare_run}


def peak_memory(method: str, kind: str, args: argparse.Namespace) -> float:
    """MiB above the imports, in a fresh process (see ``--memory-probe``)."""
    command = [sys.executable, __file__, "--memory-probe", method, kind, "--net", args.net,
               "--warmup", str(args.warmup), "--steps", "2", "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    setup = NETS[args.net]
    load = os.getloadavg()[0]
    steps: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for method in args.methods:
            for kind, runner in RUNNERS.items():
                steps.setdefault((method, kind), []).extend(runner(method, args)[0])
    memory = {(method, kind): peak_memory(method, kind, args) if args.memory else float("nan")
              for method in args.methods for kind in RUNNERS}
    median = {key: statistics.median(values) for key, values in steps.items()}
    batch = setup["batch"]
    lines = [f"Measured with `{args.command}` on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores shared with other jobs, load average {load:.1f} at the start), torch "
             f"{torch.__version__}, fp32, {torch.get_num_threads()} thread, `num_workers=0`. Net: "
             f"{setup['label']}, batch {batch}, crop {setup['size'][0]}x{setup['size'][1]} from synthetic "
             f"images of that size, augmentation on. Medians of {args.rounds} x {args.steps} steps (process "
             f"CPU time) after {args.warmup} warm-up steps per run; runs alternate. No GPU in this session. "
             "Absolute figures are noisy on this shared machine.", "",
             "| method | Lightning (images/s) | bare loop (images/s) | **Lightning / bare (step time)** | "
             "peak memory Lightning (MiB) | peak memory bare (MiB) |", "|---|---|---|---|---|---|"]
    for method in args.methods:
        fit, bare = median[(method, "lightning")], median[(method, "bare")]
        lines.append(f"| {method} | {batch / fit:.2f} | {batch / bare:.2f} | **{fit / bare:.3f}** | "
                     f"{memory[(method, 'lightning')]:.0f} | {memory[(method, 'bare')]:.0f} |")
    deft, joint = "DeFT (stage 2)", "joint"
    if deft in args.methods and joint in args.methods:
        lines += ["", f"DeFT / joint step time: **{median[(deft, 'lightning')] / median[(joint, 'lightning')]:.2f}** "
                  f"with Lightning, {median[(deft, 'bare')] / median[(joint, 'bare')]:.2f} in the bare loop; "
                  + (f"arithmetic floor from the parts table {FLOORS[args.net]:.2f}." if args.net in FLOORS
                     else "no parts table for this net.")]
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="demo", choices=list(NETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="dropped steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per method and kind, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        torch.set_num_threads(args.threads)
        method, kind = args.memory_probe
        print(json.dumps({"peak_mib": RUNNERS[kind](method, args)[1]}))
        return ""
    args.command = ("python benchmarks/throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    table = run(args)
    if args.write:
        write_section(table, MARKERS, "A whole Lightning step against a bare PyTorch loop")
    return table


if __name__ == "__main__":
    main()
