"""EMA update against the memory-bandwidth bound.

One EMA step ``θ_t ← β θ_t + (1 − β) θ_s`` must read both tensors and write the target: 3 × 4 bytes
per fp32 parameter per pair. The bound is that traffic divided by the memory bandwidth, measured
here as a large tensor copy (``dst.copy_(src)``: 1 read + 1 write per element) of ``--copy-mib``
per tensor, well beyond the caches. The EMA is the library's ``ema_update`` (one fused
``torch._foreach_lerp_`` per β) on DeFT's two pairs (retentive ← adaptive encoder and decoder).

    python benchmarks/ema_bandwidth.py --write

Medians of ``--reps``; bandwidth and EMA are timed alternately, since on a CPU shared with other
jobs the memory bandwidth is shared too.
On a GPU the same script runs with ``--device cuda`` (synchronised timing); not run in this session.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedups import NETS  # noqa: E402

from deft_lightning import DeFT  # noqa: E402
from deft_lightning.callbacks.ema import ema_update  # noqa: E402

MARKERS = ("<!-- ema:start -->", "<!-- ema:end -->")


def timer(device: torch.device):
    """CPU: this process's CPU time (a memory stall keeps the thread busy, a neighbour's turn on the
    core does not count). GPU: synchronised wall time."""
    def elapsed(fn) -> float:
        if device.type != "cuda":
            start = time.process_time()
            fn()
            return time.process_time() - start
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return elapsed


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    task = DeFT(**NETS[name]["net"], encoder_weights=None, warmup_steps=0).to(device)
    pairs = task.ema_pairs()
    params = sum(p.numel() for pair in pairs for p in pair.target.parameters())
    ema_bytes = 3 * 4 * params  # read target, read source, write target (fp32)
    elements = args.copy_mib * 2**20 // 4
    src, dst = torch.rand(elements, device=device), torch.empty(elements, device=device)
    elapsed = timer(device)
    copies, emas = [], []
    for rep in range(args.reps + 1):
        copy_time, ema_time = elapsed(lambda: dst.copy_(src)), elapsed(lambda: ema_update(pairs))
        if rep:  # the first round warms caches and allocators up
            copies.append(copy_time)
            emas.append(ema_time)
    bandwidth = 2 * 4 * elements / statistics.median(copies)
    ema = statistics.median(emas)
    bound = ema_bytes / bandwidth
    return {"params": params, "bandwidth": bandwidth, "ema": ema, "bound": bound}


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    device = args.device if args.device != "cpu" else (platform.processor() or platform.machine())
    lines = [f"Measured with `{args.command}` on {device} ({os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f} at the start, shared), torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread, process CPU time, medians of {args.reps} alternating repetitions. "
             "Bandwidth: a copy of "
             f"{args.copy_mib} MiB (read + write). Bound: 12 bytes per parameter per pair / bandwidth.", "",
             "| net (DeFT, 2 pairs) | parameters updated | bandwidth (GB/s) | EMA fused (ms) | bound (ms) | "
             "**EMA / bound** |", "|---|---|---|---|---|---|"]
    for name in args.nets:
        r = measure(name, args)
        lines.append(f"| {NETS[name]['label']} | {r['params'] / 1e6:.1f} M | {r['bandwidth'] / 1e9:.1f} | "
                     f"{1e3 * r['ema']:.1f} | {1e3 * r['bound']:.1f} | **{r['ema'] / r['bound']:.2f}** |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["r50", "demo"], choices=list(NETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--copy-mib", type=int, default=512, help="size of each tensor of the copy")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.command = ("python benchmarks/ema_bandwidth.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    table = run(args)
    print(table)
    if args.write:
        from speedups import write_section
        write_section(table, MARKERS, "EMA against the memory bandwidth")
    return table


if __name__ == "__main__":
    main()
