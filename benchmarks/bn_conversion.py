"""Cost of DAFT's BN conversion against the plain eval forwards over the same batches.

BN conversion (Algorithm 1) is one eval-mode forward per calibration batch with a forward
pre-hook on every BN layer (channel mean and variance of its input), then an elementwise
rewrite of every BN layer. This script times, side by side and interleaved (plain, convert,
plain, convert, ...), ``--batches`` plain eval forwards and one ``convert_bn`` over the same
batches, reports the medians and their ratio, and writes the table to docs/bn_conversion.md.

    python benchmarks/bn_conversion.py --batches 8 --batch-size 2 --size 256 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from deft_lightning import SegmentationNet
from deft_lightning.callbacks import convert_bn

DOC = Path(__file__).resolve().parents[1] / "docs" / "bn_conversion.md"
NET = {"arch": "DeepLabV3Plus", "encoder_name": "resnet50", "encoder_weights": None,
       "arch_kwargs": {"encoder_output_stride": 16, "decoder_atrous_rates": (6, 12, 18)}}
LIMIT = 1.2  # conversion time / plain eval forwards time


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


@torch.no_grad()
def plain_forwards(net: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    net.eval()
    for images in batches:
        net(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-doc", action="store_true", help="print only, do not write docs/bn_conversion.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net = SegmentationNet(**NET)
    batches = [torch.rand(args.batch_size, 3, args.size, args.size) for _ in range(args.batches)]
    layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    plain_forwards(net, batches[:1])  # warm-up (allocator, one-off kernel selection)
    times: dict[str, list[float]] = {"plain eval forwards": [], "BN conversion": []}
    for repeat in range(args.repeats):
        for name, run in (("plain eval forwards", lambda: plain_forwards(net, batches)),
                          ("BN conversion", lambda: convert_bn(net, [net], batches))):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(f"repeat {repeat + 1}/{args.repeats}  {name}: {times[name][-1]:.2f} s", flush=True)

    plain, conversion = (statistics.median(times[name]) for name in times)
    ratio = conversion / plain
    command = "python benchmarks/bn_conversion.py " + " ".join(sys.argv[1:])
    table = "\n".join([
        f"DeepLabV3+ ResNet-50 (output stride 16, random init, {layers} BN layers), "
        f"{args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, float32, "
        f"{args.threads} CPU threads ({cpu_name()}), torch {torch.__version__}; "
        f"median of {args.repeats} interleaved repeats.",
        "",
        "| measured | median time (s) | per batch (s) | all repeats (s) |",
        "|---|---|---|---|",
        *(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / args.batches:.3f} | "
          f"{', '.join(f'{v:.2f}' for v in values)} |" for name, values in times.items()),
        "",
        f"Ratio conversion / plain eval forwards: **{ratio:.3f}** (limit {LIMIT}: "
        f"{'met' if ratio <= LIMIT else 'NOT met'}).",
        "",
        f"Command: `{command}`",
    ])
    print(table)
    if not args.no_doc:
        DOC.write_text(DOC_HEADER + table + "\n")
        print(f"written to {DOC}")
    if ratio > LIMIT:
        raise SystemExit(f"BN conversion costs {ratio:.2f}x the plain eval forwards (limit {LIMIT}x)")


DOC_HEADER = """# BN conversion cost

DAFT's BN conversion (Algorithm 1, `deft_lightning.callbacks.BNConversion`) runs once before
the first training step: one eval-mode forward per calibration batch, a forward pre-hook on
every BatchNorm layer that takes the channel mean and variance of the layer's input
(`channel_moments`: two passes over each sample-channel row in float32, rows combined in
float64; `torch.var_mean` over dims (0, 2, 3) was ~9x slower on this CPU), then an elementwise rewrite of each layer's γ, β and running statistics. Its cost should be
that of the eval forwards plus a little; `benchmarks/bn_conversion.py` checks it stays within
1.2x of the plain eval forwards over the same batches, measured side by side in one run
(interleaved repeats, medians).

CPU only: no GPU was available when this table was measured. The machine is shared (other
jobs were running), which is why the two measurements are interleaved and the ratio, not the
absolute time, is the figure to read.

"""


if __name__ == "__main__":
    main()
