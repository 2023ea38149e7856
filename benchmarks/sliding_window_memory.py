"""Peak memory of whole-image vs sliding-window inference on a 2048x1024 image (Cityscapes size).

Each mode runs in its own process (a fresh peak): the process's peak resident memory after one
no-grad forward minus its peak before it (CPU), or torch's peak allocated memory (CUDA).
Writes the table to docs/sliding_window.md between the benchmark markers.

    python benchmarks/sliding_window_memory.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "sliding_window.md"
START, END = "<!-- benchmark -->", "<!-- /benchmark -->"
MODES = {"whole image": None, "slide 1024x1024, stride 683": ((1024, 1024), (683, 683)),
         "slide 512x1024, stride 341x683": ((512, 1024), (341, 683))}


def measure(mode: str, device: str, threads: int) -> dict:
    import torch

    from deft_lightning.net import SegmentationNet
    from deft_lightning.sliding_window import sliding_window_logits

    torch.set_num_threads(threads)
    net = SegmentationNet("Unet", "mobilenet_v2", None).eval().to(device)
    images = torch.rand(1, 3, 1024, 2048, device=device)
    setting = MODES[mode]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        logits = net(images) if setting is None else sliding_window_logits(net, images, *setting)
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10
    assert logits.shape == (1, 19, 1024, 2048)
    return {"mode": mode, "peak_mib": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.threads)))
        return
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--device", args.device,
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    whole = rows[0]["peak_mib"]
    table = ["| inference | peak memory (MiB) | vs whole image | time (s) |", "|---|---|---|---|"]
    table += [f"| {r['mode']} | {r['peak_mib']:.0f} | {r['peak_mib'] / whole:.2f} | {r['seconds']:.1f} |" for r in rows]
    command = "python benchmarks/sliding_window_memory.py " + " ".join(sys.argv[1:])
    block = (f"{START}\nsmp Unet, MobileNetV2 encoder, one 2048x1024 image, no grad, fp32, {args.device}"
             f" ({args.threads} threads); `{command}`:\n\n" + "\n".join(table) + f"\n{END}")
    print(block)
    if not args.no_doc:
        text = DOC.read_text()
        DOC.write_text(text[:text.index(START)] + block + text[text.index(END) + len(END):])


if __name__ == "__main__":
    main()
