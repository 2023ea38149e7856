"""A test run's results on disk, beside ``test_iou.md``: ``test_results.json`` (per domain: the
confusion matrix summed over the split, per-class IoU, mIoU; which domain is the source) and
``confusion_<domain>.png``. ``deft-lightning report`` reads the JSON."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from torch import Tensor

from .data.labels import class_names
from .metrics import iou_per_class
from .plots import confusion_figure, save

RESULTS_FILE = "test_results.json"


def confusion_png_name(domain: str) -> str:
    return "confusion_" + re.sub(r"[^A-Za-z0-9._-]+", "_", domain) + ".png"


def write_test_results(folder: str | Path, confusions: dict[str, Tensor], source_domain: str | None) -> Path:
    """Write ``test_results.json`` and one confusion-matrix PNG per domain into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = class_names(len(next(iter(confusions.values()))))
    domains = {}
    for domain, confusion in confusions.items():
        iou = iou_per_class(confusion)
        miou = float(iou.nanmean())
        domains[domain] = {"mIoU": miou, "iou": [None if math.isnan(v) else v for v in iou.tolist()],
                           "confusion": confusion.long().tolist()}
        role = "source, held-out" if domain == source_domain else "target"
        figure = confusion_figure(confusion.cpu().numpy(), classes, f"{domain} ({role}): mIoU {100 * miou:.1f}")
        save(figure, folder / confusion_png_name(domain))
    path = folder / RESULTS_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"source": source_domain, "classes": classes, "domains": domains}) + "\n")
    partial.replace(path)
    return path


def read_test_results(path: str | Path) -> dict:
    """The JSON written by :func:`write_test_results`, with per-class IoU as float arrays (NaN
    for a class absent from truth and prediction)."""
    results = json.loads(Path(path).read_text())
    for entry in results["domains"].values():
        entry["iou"] = np.array([math.nan if v is None else v for v in entry["iou"]], dtype=np.float64)
    return results
