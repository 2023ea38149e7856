"""Peak memory and time of `deft-lightning merge` for K = 2, 4, 8 DeepLabV3+ ResNet-50 checkpoints.

Writes K task checkpoints (JointFinetune, random weights, each with an SGD momentum buffer
the size of the net, as a training checkpoint holds), then merges the first K of them in a
fresh process per K (``merge()`` itself, layer-wise and uniform) and reads that process's
peak resident memory (VmHWM, /proc). A fresh process that only imports and builds nothing
gives the baseline. Peak memory should stay about two nets above the baseline whatever K.

    python benchmarks/merge_memory.py --out docs/merging.md --benchmarks docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NET = {"arch": "DeepLabV3Plus", "encoder_name": "resnet50", "encoder_weights": None}
COUNTS = (2, 4, 8)

# Run in a fresh interpreter: merge (or only import), then report time and VmHWM as JSON.
CHILD = r"""
import json, sys, time
from deft_lightning.merge_checkpoints import merge
paths, mode, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
start = time.perf_counter()
if paths:
    merge(checkpoints=paths, mode=mode, out=out)
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmHWM", "VmRSS")))
print(json.dumps({"seconds": seconds, "hwm_mib": int(status["VmHWM"].split()[0]) / 1024}))
"""


def write_checkpoints(folder: Path, count: int) -> tuple[list[str], float]:
    """``count`` JointFinetune checkpoints as Lightning writes them; returns paths and net MiB."""
    import torch

    from deft_lightning import JointFinetune

    paths = []
    for index in range(count):
        torch.manual_seed(index)
        task = JointFinetune(**NET)
        state = task.state_dict()
        momentum = {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(task.parameters())}
        path = folder / f"r50_{index}.ckpt"
        torch.save({"state_dict": state, "hyper_parameters": dict(task.hparams), "global_step": index,
                    "task_class": "deft_lightning.tasks.joint.JointFinetune",
                    "optimizer_states": [{"state": momentum, "param_groups": []}]}, path)
        paths.append(str(path))
    net_mib = sum(t.numel() * t.element_size() for t in task.net.state_dict().values()) / 2**20
    return paths, net_mib


def run_child(paths: list[str], mode: str, out: Path) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths), mode, str(out)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="write the table into this Markdown file (docs/merging.md)")
    parser.add_argument("--benchmarks", type=Path, help="and into its section of docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        paths, net_mib = write_checkpoints(Path(folder), max(COUNTS))
        file_mib = os.path.getsize(paths[0]) / 2**20
        baseline = run_child([], "layerwise", Path(folder) / "none.ckpt")["hwm_mib"]
        rows = []
        for mode in ("layerwise", "uniform"):
            for count in COUNTS:
                result = run_child(paths[:count], mode, Path(folder) / f"merged_{mode}_{count}.ckpt")
                rows.append((mode, count, result))
                print(mode, count, result, flush=True)
    load = os.getloadavg()[0]
    lines = [f"Measured with `python benchmarks/merge_memory.py` on {platform.machine()}, {os.cpu_count()} CPU "
             f"cores (shared; load average {load:.1f} at the end). DeepLabV3+ ResNet-50, fp32: "
             f"{net_mib:.0f} MiB of weights; each checkpoint file {file_mib:.0f} MiB (net + SGD momentum). "
             f"Baseline (a fresh process after imports): {baseline:.0f} MiB.",
             "",
             "| mode | K | time (s) | peak RSS (MiB) | peak above baseline (MiB) | above baseline / net size |",
             "|---|---|---|---|---|---|"]
    for mode, count, result in rows:
        above = result["hwm_mib"] - baseline
        lines.append(f"| {mode} | {count} | {result['seconds']:.1f} | {result['hwm_mib']:.0f} | {above:.0f} | "
                     f"{above / net_mib:.2f} |")
    table = "\n".join(lines)
    print(table)
    sys.path.insert(0, str(Path(__file__).parent))
    from merge_recipes import replace_section

    for path in (args.out, args.benchmarks):
        if path:
            replace_section(path, "merge-memory", table)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.0f} s")
