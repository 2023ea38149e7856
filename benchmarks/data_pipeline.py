"""Decode + augmentation throughput of one data-loader worker, and the workers a GPU step needs.

Images of ``--size`` (default 1024x2048, Cityscapes' size) are generated once with the
library's synthetic street scenes (``render_scene``) and written as PNG (lossless, zlib level 3
as OpenCV writes by default) and JPEG (quality 95), with PNG label masks. Each reader decodes image
and mask: PIL (``Image.open(...).convert``), OpenCV (``cv2.imread`` + BGR->RGB) and
torchvision.io (``decode_image``). The augmentation is the library's training pipeline
(``train_transform``: random scale 0.5-2, pad, crop ``--crop``, flip, colour jitter, blur)
followed by ``make_sample``'s conversion to float tensors, exactly what a worker does per image.

One thread everywhere (torch, OpenCV), as one worker among several would have; times are this
process's CPU time (the machine is shared), medians over ``--reps`` passes over the files.

    python benchmarks/data_pipeline.py --write
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedups import write_section  # noqa: E402

from deft_lightning.data.sample import make_sample  # noqa: E402
from deft_lightning.data.synthetic import render_scene  # noqa: E402
from deft_lightning.data.transforms import train_transform  # noqa: E402

MARKERS = ("<!-- data:start -->", "<!-- data:end -->")


def pil_read(path: Path, mask: bool = False) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image if mask else image.convert("RGB"))


def opencv_read(path: Path, mask: bool = False) -> np.ndarray:
    if mask:
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def torchvision_read(path: Path, mask: bool = False) -> np.ndarray:
    data = torchvision.io.read_file(str(path))
    decoded = decode_image(data, mode=ImageReadMode.UNCHANGED if mask else ImageReadMode.RGB)
    return decoded[0].numpy() if mask else decoded.permute(1, 2, 0).numpy()


READERS = {"PIL": pil_read, "OpenCV": opencv_read, "torchvision.io": torchvision_read}


def write_files(folder: Path, count: int, size: tuple[int, int]) -> dict[str, list[tuple[Path, Path]]]:
    files: dict[str, list[tuple[Path, Path]]] = {"PNG": [], "JPEG": []}
    for index in range(count):
        image, mask = render_scene(0, "clear", index, *size)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        mask_path = folder / f"{index}_mask.png"
        cv2.imwrite(str(mask_path), mask)
        cv2.imwrite(str(folder / f"{index}.png"), bgr)
        cv2.imwrite(str(folder / f"{index}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        files["PNG"].append((folder / f"{index}.png", mask_path))
        files["JPEG"].append((folder / f"{index}.jpg", mask_path))
    return files


def per_image_seconds(fn, items, reps: int) -> float:
    """Median over passes of (pass CPU time / images in the pass)."""
    times = []
    for _ in range(reps):
        start = time.process_time()
        for item in items:
            fn(item)
        times.append((time.process_time() - start) / len(items))
    return statistics.median(times)


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    size, crop = tuple(args.size), tuple(args.crop)
    transform = train_transform(crop)
    transform.set_random_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(Path(tmp), args.images, size)
        decoded = [READERS["OpenCV"](image) for image, _ in files["PNG"]]
        masks = [READERS["OpenCV"](mask, mask=True) for _, mask in files["PNG"]]
        pairs = list(zip(decoded, masks))
        augment = per_image_seconds(lambda pair: make_sample(pair[0], pair[1], "clear", "x", transform),
                                    pairs, args.reps)
        for kind, paths in files.items():
            for reader_name, read in READERS.items():
                decode = per_image_seconds(lambda p: (read(p[0]), read(p[1], mask=True)), paths, args.reps)
                both = per_image_seconds(lambda p: make_sample(read(p[0]), read(p[1], mask=True), "clear", "x",
                                                               transform), paths, args.reps)
                rows.append((kind, reader_name, decode, both))
    lines = [f"Measured with `{args.command}` on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores shared with other jobs, load average {os.getloadavg()[0]:.1f} at the "
             f"start), torch {torch.__version__}, torchvision {torchvision.__version__}, OpenCV "
             f"{cv2.__version__}, one thread, process CPU time, medians of {args.reps} passes over "
             f"{args.images} generated {size[0]}x{size[1]} images (+ PNG masks), crop {crop[0]}x{crop[1]}.", "",
             f"Augmentation alone (train_transform + to tensors, on decoded arrays): {1e3 * augment:.0f} ms per "
             f"image, {1 / augment:.1f} images/s per worker.", "",
             "| format | reader | decode image + mask (ms) | decode + augment (ms) | **images/s per worker** |",
             "|---|---|---|---|---|"]
    for kind, reader, decode, both in rows:
        lines.append(f"| {kind} | {reader} | {1e3 * decode:.0f} | {1e3 * both:.0f} | **{1 / both:.1f}** |")
    best = {kind: max(1 / both for k, _, _, both in rows if k == kind) for kind in files}
    lines += ["", "Workers needed = GPU demand (images/s) / images/s per worker (best reader), rounded up:", "",
              "| GPU demand (images/s) | " + " | ".join(f"workers, {kind}" for kind in best) + " |",
              "|---|" + "---|" * len(best)]
    for demand in args.demands:
        lines.append(f"| {demand:g} | " + " | ".join(f"{int(np.ceil(demand / rate))}" for rate in best.values()) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--crop", type=int, nargs=2, default=[768, 768], metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=4, help="generated files per format")
    parser.add_argument("--reps", type=int, default=3, help="passes over the files")
    parser.add_argument("--demands", type=float, nargs="+", default=[10, 25, 50, 100],
                        help="GPU step demands (images/s) to size the worker count for")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.command = ("python benchmarks/data_pipeline.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    table = run(args)
    if args.write:
        write_section(table, MARKERS, "Data pipeline: decode + augmentation per worker")
    return table


if __name__ == "__main__":
    main()
