"""Fit FisherTune (DR-FIM scores, global top 5 %) for 2 steps with 2-process DDP on CPU (gloo).

Run as a script (never inside pytest: Lightning's DDP launcher re-executes sys.argv).
Every rank writes ``rank<r>.json``: a digest of its masks and encoder/decoder parameters, the
number of selected entries, and a digest of the images its estimation saw.
    python ddp_fishertune.py OUT_DIR
"""

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_DATA, TINY_NET  # noqa: E402
from deft_lightning import DGSegDataModule, FisherTune  # noqa: E402

DDP_DATA = dict(TINY_DATA, synthetic_image_size=(32, 64), crop_size=(32, 64), batch_size=2)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RecordingFisherTune(FisherTune):
    def estimation_data(self):
        batches = super().estimation_data()
        self.estimation_digest = digest(images for images, _ in batches)
        return batches


def main(out: Path) -> None:
    torch.set_num_threads(1)
    task = RecordingFisherTune(**TINY_NET, score="dr_fim", fraction=0.05, estimation_batches=1, weight_decay=1e-2)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)
    trainer.fit(task, DGSegDataModule(**DDP_DATA))
    record = {
        "masks": digest(task.masks.values()),
        "selected": sum(int(m.sum()) for m in task.masks.values()),
        "params": digest(task.net.parameters()),
        "estimation_images": task.estimation_digest,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
