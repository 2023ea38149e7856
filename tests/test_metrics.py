import numpy as np
import pytest
import torch

from deft_lightning.metrics import DomainIoU, iou_per_class, mean_iou


def numpy_miou(preds: np.ndarray, truth: np.ndarray, num_classes: int, ignore: int = 255) -> float:
    """Independent reference: IoU per class over all pixels, classes absent from both skipped."""
    valid = truth != ignore
    ious = []
    for c in range(num_classes):
        p, t = (preds == c) & valid, (truth == c) & valid
        union = np.logical_or(p, t).sum()
        if union == 0:
            continue
        ious.append(np.logical_and(p, t).sum() / union)
    return float(np.mean(ious))


def test_miou_matches_numpy_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    num_classes = 19
    # Classes 15..18 never occur in truth nor prediction; some pixels are ignored.
    truth = rng.integers(0, 15, size=(6, 32, 48))
    truth[rng.random(truth.shape) < 0.2] = 255
    preds = np.where(rng.random(truth.shape) < 0.6, np.where(truth == 255, 3, truth), rng.integers(0, 15, truth.shape))
    metric = DomainIoU(["a"], num_classes)
    for i in range(0, 6, 2):  # accumulated over batches, not averaged per batch
        metric.update("a", torch.from_numpy(preds[i:i + 2]), torch.from_numpy(truth[i:i + 2]))
    ious = metric.compute()["a"]
    assert torch.isnan(ious[15:]).all()
    assert ious.nanmean().item() == pytest.approx(numpy_miou(preds, truth, num_classes), abs=1e-12)


def test_per_batch_average_differs_from_dataset_miou():
    """The protocol's one-matrix mIoU is not the mean of per-batch mIoUs (guards a regression)."""
    truth = torch.tensor([[[0, 0, 0, 1]], [[1, 1, 1, 1]]])
    preds = torch.tensor([[[0, 0, 0, 0]], [[1, 1, 1, 1]]])
    metric = DomainIoU(["a"], 2)
    metric.update("a", preds, truth)
    whole = metric.compute()["a"].nanmean().item()
    per_batch = np.mean([numpy_miou(preds[i].numpy(), truth[i].numpy(), 2) for i in range(2)])
    assert whole == pytest.approx(numpy_miou(preds.numpy(), truth.numpy(), 2))
    assert whole != pytest.approx(per_batch)


def test_domains_stay_separate():
    truth = torch.randint(0, 5, (2, 16, 16))
    wrong = (truth + 1) % 5
    wrong[:, :8] = truth[:, :8]  # half right
    metric = DomainIoU(["perfect", "half"], 19)  # "half" is also an nn.Module method name
    metric.update("perfect", truth, truth)
    metric.update("half", wrong, truth)
    ious = metric.compute()
    assert ious["perfect"].nanmean().item() == 1.0
    expected = numpy_miou(wrong.numpy(), truth.numpy(), 19)
    assert ious["half"].nanmean().item() == pytest.approx(expected)
    assert expected < 1.0


def test_iou_helpers_on_a_known_matrix():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    ious = iou_per_class(confusion)
    assert ious[0].item() == pytest.approx(3 / 4)
    assert ious[1].item() == pytest.approx(2 / 3)
    assert torch.isnan(ious[2])
    assert mean_iou(confusion).item() == pytest.approx((3 / 4 + 2 / 3) / 2)


@pytest.mark.parametrize("names", [["a", "a"], [""]])
def test_bad_domain_names_are_rejected(names):
    with pytest.raises(ValueError, match="domain"):
        DomainIoU(names)
