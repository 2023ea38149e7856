"""The real-world datasets of the domain-generalization benchmarks, read from their own folders.

Every dataset here is a :class:`SegmentationDataset`: a list of (image path, label path)
pairs, a domain name, an optional albumentations transform, and an id lookup table that maps
the dataset's own label ids to the 19 Cityscapes train ids (``None`` when the labels already
hold train ids; those are then checked with :func:`~deft_lightning.data.sample.check_mask_ids`).
Items are samples in the library's one format (see :mod:`deft_lightning.data.sample`).

Each concrete dataset only lists its files for a ``root`` and ``split``; errors name the file
or folder at fault and, for a missing folder, the layout that was expected. ``DATASETS`` and
:func:`build_dataset` let a config name a dataset. The folder layouts are in ``docs/datasets.md``.

Images and label images are decoded in full with Pillow, which raises on a truncated file
(OpenCV decodes a truncated JPEG with a grey lower part and only a libjpeg warning) and keeps
the class indices of palette PNGs (GTAV, Mapillary) where OpenCV would expand them to colours.
SYNTHIA's 16-bit labels are the exception, read with OpenCV (see :class:`SynthiaDataset`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from .labels import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    MAPILLARY_ID_TO_TRAIN_ID,
    SYNTHIA_ID_TO_TRAIN_ID,
    lookup_table,
)
from .sample import Transform, check_mask_ids, make_sample

ImageLabelPair = tuple[Path, Path | None]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


def _decode(path: Path) -> Image.Image:
    """The fully decoded Pillow image at ``path``; a truncated or corrupt file raises ``OSError``
    naming it (truncated files are never padded: ``LOAD_TRUNCATED_IMAGES`` must stay off)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images would be "
                           "decoded as grey; turn it off")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (OSError, SyntaxError, ValueError) as error:
        raise OSError(f"{path}: cannot decode ({error})") from error


def read_image(path: Path) -> np.ndarray:
    """The uint8 RGB (H, W, 3) image at ``path`` (grey, palette, RGBA, CMYK and 16-bit images
    converted; EXIF orientation applied); ``OSError`` naming the file if it is missing,
    truncated or corrupt."""
    image = ImageOps.exif_transpose(_decode(Path(path)))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits
        return np.repeat((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


def read_label(path: Path) -> np.ndarray:
    """The (H, W) array of ids in the single-channel (grey or palette) label image at ``path``."""
    try:
        ids = np.asarray(_decode(Path(path)))
    except OSError as error:
        raise OSError(f"{path}: cannot decode label image ({error.__cause__ or error})") from error
    if ids.ndim != 2:
        raise ValueError(
            f"{path}: expected a single-channel label image of class ids, got shape {ids.shape} "
            "(a colour-coded label image?)"
        )
    return ids


def resize_and_center_crop(
    image: np.ndarray, mask: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to height ``size`` keeping the aspect ratio (bicubic image, nearest mask), then
    centre-crop or centre-pad the width to ``size``: padding is 0 (black) in the image and
    255 (ignore) in the mask. The resize is PIL's, as in the authors' code: its bicubic filter
    widens with the downscale factor (antialiased), where OpenCV's samples 4x4 pixels and
    aliases at Mapillary's 2-3x reduction."""
    height, width = image.shape[:2]
    new_width = max(1, round(width * size / height))
    image = np.asarray(Image.fromarray(image).resize((new_width, size), Image.Resampling.BICUBIC))
    mask = np.asarray(Image.fromarray(mask).resize((new_width, size), Image.Resampling.NEAREST))
    if new_width >= size:
        left = (new_width - size) // 2
        return image[:, left : left + size], mask[:, left : left + size]
    left = (size - new_width) // 2
    right = size - new_width - left
    image = np.pad(image, ((0, 0), (left, right), (0, 0)), constant_values=0)
    mask = np.pad(mask, ((0, 0), (left, right)), constant_values=IGNORE_INDEX)
    return image, mask


class SegmentationDataset(Dataset):
    """Image/label file pairs -> samples (``image``, ``mask``, ``domain``, ``name``).

    Args:
        pairs: (image path, label path) pairs; a ``None`` label path yields an all-ignore mask.
        domain: the domain name every sample carries (per-domain metrics key on it).
        transform: albumentations transform applied to the uint8 image and train-id mask.
        id_table: lookup table from the label files' ids to train ids (see
            :func:`~deft_lightning.data.labels.lookup_table`); ``None`` when the label files
            already hold train ids, which are then validated.
    """

    def __init__(
        self,
        pairs: Sequence[ImageLabelPair],
        domain: str,
        transform: Transform | None = None,
        id_table: np.ndarray | None = None,
    ) -> None:
        self.pairs = [
            (Path(image), None if label is None else Path(label)) for image, label in pairs
        ]
        self.domain = domain
        self.transform = transform
        self.id_table = id_table

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return self.sample(index)

    def sample(self, index: int, **transform_args) -> dict:
        """Item ``index``, with extra named inputs for the transform (e.g. ``crop_class``)."""
        image, mask = self.load(index)
        return make_sample(image, mask, self.domain, self.name_of(index), self.transform, **transform_args)

    def name_of(self, index: int) -> str:
        """The sample name of pair ``index``: its image file's stem."""
        return self.pairs[index][0].stem

    def load_mask(self, index: int) -> np.ndarray | None:
        """The train-id mask of pair ``index`` alone (no image decoded), before the transform."""
        label_path = self.pairs[index][1]
        return None if label_path is None else self.to_train_ids(self.read_ids(label_path), label_path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The uint8 RGB image and uint8 train-id mask (``None`` if unlabelled) of pair ``index``,
        before the transform."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        if label_path is None:
            return image, None
        mask = self.to_train_ids(self.read_ids(label_path), label_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                f"{label_path} is {mask.shape[1]}x{mask.shape[0]} (width x height)"
            )
        return image, mask

    def read_ids(self, path: Path) -> np.ndarray:
        """The raw (H, W) ids of the label file at ``path``."""
        return read_label(path)

    def to_train_ids(self, ids: np.ndarray, path: Path) -> np.ndarray:
        """Map ``ids`` read from ``path`` to uint8 train ids (or validate them as train ids)."""
        if self.id_table is None:
            check_mask_ids(ids, str(path))
            return ids.astype(np.uint8)
        if ids.size and int(ids.max()) >= self.id_table.size:
            raise ValueError(
                f"{path}: label id {int(ids.max())} exceeds the id map of this dataset "
                f"(ids 0..{self.id_table.size - 1})"
            )
        return self.id_table[ids]


def _require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        what = "expected a folder, found a file" if path.exists() else "folder not found"
        raise FileNotFoundError(f"{what}: {path}\nexpected layout: {layout}")
    return path


def _list_files(folder: Path, pattern: str, layout: str) -> list[Path]:
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files match {folder / pattern}\nexpected layout: {layout}")
    return files


#: While set (by :func:`collect_missing_labels`), images without a label are recorded here and
#: left out instead of raising: ``deft-lightning check-data`` reports every problem in one pass.
_MISSING_LABELS: ContextVar[list[tuple[Path, Path]] | None] = ContextVar("missing_labels", default=None)


@contextmanager
def collect_missing_labels() -> Iterator[list[tuple[Path, Path]]]:
    """Within the block, datasets built leave out images whose label file is missing and list
    them, as (image, expected label), in the yielded list."""
    missing: list[tuple[Path, Path]] = []
    token = _MISSING_LABELS.set(missing)
    try:
        yield missing
    finally:
        _MISSING_LABELS.reset(token)


def _with_labels(images: Sequence[Path], label_for, layout: str) -> list[ImageLabelPair]:
    """Pair every image with ``label_for(image)``; images whose label is missing are an error
    naming them all (or are listed, inside :func:`collect_missing_labels`)."""
    pairs = [(image, label_for(image)) for image in images]
    missing = [(image, label) for image, label in pairs if not label.is_file()]
    collected = _MISSING_LABELS.get()
    if missing and collected is not None:
        collected += missing
        return [(image, label) for image, label in pairs if label.is_file()]
    if missing:
        listing = "\n".join(f"  {image}: expected {label}" for image, label in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(
            f"no label for {len(missing)} of {len(pairs)} images:\n{listing}{more}\nexpected layout: {layout}"
        )
    return pairs


def _images_in_split(
    root: Path, image_dir: Path, split: str, split_file: str | None, layout: str
) -> list[Path]:
    """Every ``*.png`` in ``image_dir`` for ``split="all"``, else the images named one a line
    (extension optional) in ``split_file``, default ``<root>/<split>.txt``."""
    if split == "all":
        return _list_files(image_dir, "*.png", layout)
    list_path = Path(split_file) if split_file is not None else root / f"{split}.txt"
    if not list_path.is_file():
        raise FileNotFoundError(
            f"split list not found: {list_path} (a text file of image names, one a line; "
            "use split='all' for every image)"
        )
    lines = [line.strip() for line in list_path.read_text().splitlines()]
    images = [image_dir / f"{Path(line).stem}.png" for line in lines if line]
    if not images:
        raise ValueError(f"split list {list_path} names no images")
    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images named in the split list {list_path} are missing, "
            f"e.g. {missing[:3]}"
        )
    return images


def _same_size(image: Path, label: Path) -> bool:
    """Whether two image files have the same size, from their headers only."""
    sizes = []
    for path in (image, label):
        try:
            with Image.open(path) as opened:
                sizes.append(opened.size)
        except OSError as error:
            raise OSError(f"{path}: cannot decode image header ({error})") from error
    return sizes[0] == sizes[1]


class CityscapesDataset(SegmentationDataset):
    """Cityscapes (gtFine): label ids -> train ids. ``split``: train, val or test."""

    layout = (
        "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
        "<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png"
    )

    def __init__(
        self, root: str, split: str, domain: str | None = None, transform: Transform | None = None
    ) -> None:
        root_dir = _require_dir(Path(root), self.layout)
        image_dir = _require_dir(root_dir / "leftImg8bit" / split, self.layout)
        label_dir = _require_dir(root_dir / "gtFine" / split, self.layout)
        images = _list_files(image_dir, "*/*_leftImg8bit.png", self.layout)

        def label_for(image: Path) -> Path:
            stem = image.name.removesuffix("_leftImg8bit.png")
            return label_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"

        super().__init__(
            _with_labels(images, label_for, self.layout),
            domain or "cityscapes",
            transform,
            lookup_table(CITYSCAPES_ID_TO_TRAIN_ID),
        )


class GTAVDataset(SegmentationDataset):
    """GTAV (Playing for Data): Cityscapes label ids -> train ids.

    ``split="all"`` takes every image; any other split reads its image names from
    ``split_file`` (default ``<root>/<split>.txt``, one name a line, extension optional).
    Pairs whose image and label sizes differ are skipped with a warning, as RobustNet does
    (their headers are read once at construction).
    """

    layout = "<root>/images/*.png and <root>/labels/*.png (same names), optional <root>/<split>.txt"

    def __init__(
        self,
        root: str,
        split: str,
        domain: str | None = None,
        transform: Transform | None = None,
        split_file: str | None = None,
    ) -> None:
        root_dir = _require_dir(Path(root), self.layout)
        image_dir = _require_dir(root_dir / "images", self.layout)
        label_dir = _require_dir(root_dir / "labels", self.layout)
        images = _images_in_split(root_dir, image_dir, split, split_file, self.layout)
        pairs = _with_labels(images, lambda image: label_dir / image.name, self.layout)
        same_size = [_same_size(image, label) for image, label in pairs]
        kept = [pair for pair, same in zip(pairs, same_size) if same]
        skipped = [image.name for (image, _), same in zip(pairs, same_size) if not same]
        if skipped:
            warnings.warn(
                f"GTAV: skipped {len(skipped)} of {len(pairs)} image/label pairs whose sizes "
                f"differ, e.g. {skipped[:5]}",
                stacklevel=2,
            )
        super().__init__(kept, domain or "gtav", transform, lookup_table(CITYSCAPES_ID_TO_TRAIN_ID))


class BDD100KDataset(SegmentationDataset):
    """BDD100K 10k semantic segmentation, labels already in train ids (validated).

    Accepts the official layout and the DG authors' copy; ``split``: train or val.
    """

    layout = (
        "<root>/images/10k/<split>/*.jpg and <root>/labels/sem_seg/masks/<split>/*.png (official), "
        "or <root>/images/<split>/*.jpg and <root>/labels/<split>/*_train_id.png (authors' copy)"
    )

    def __init__(
        self, root: str, split: str, domain: str | None = None, transform: Transform | None = None
    ) -> None:
        root_dir = _require_dir(Path(root), self.layout)
        if (root_dir / "images" / "10k").is_dir():
            image_dir = _require_dir(root_dir / "images" / "10k" / split, self.layout)
            label_dir = _require_dir(root_dir / "labels" / "sem_seg" / "masks" / split, self.layout)
            label_name = "{}.png"
        else:
            image_dir = _require_dir(root_dir / "images" / split, self.layout)
            label_dir = _require_dir(root_dir / "labels" / split, self.layout)
            label_name = "{}_train_id.png"
        images = _list_files(image_dir, "*.jpg", self.layout)
        pairs = _with_labels(
            images, lambda image: label_dir / label_name.format(image.stem), self.layout
        )
        super().__init__(pairs, domain or "bdd100k", transform)


class MapillaryDataset(SegmentationDataset):
    """Mapillary Vistas v1.2 (66 classes): Vistas ids -> train ids.

    ``split``: training or validation (train and val also accepted). Each sample is resized
    to height ``size`` (bicubic image, nearest labels) and centre-cropped or padded to
    ``size`` x ``size``, padding the image with 0 and the labels with 255 (ignore; the
    authors' code pads labels with 0 = road). ``size=None`` keeps the native resolution.
    """

    layout = (
        "<root>/<training|validation>/images/*.jpg and "
        "<root>/<training|validation>/labels/*.png"
    )
    split_aliases = {"train": "training", "val": "validation"}

    def __init__(
        self,
        root: str,
        split: str,
        domain: str | None = None,
        transform: Transform | None = None,
        size: int | None = 1536,
    ) -> None:
        root_dir = _require_dir(Path(root), self.layout)
        split_dir = _require_dir(root_dir / self.split_aliases.get(split, split), self.layout)
        image_dir = _require_dir(split_dir / "images", self.layout)
        label_dir = _require_dir(split_dir / "labels", self.layout)
        images = _list_files(image_dir, "*.jpg", self.layout)
        pairs = _with_labels(images, lambda image: label_dir / f"{image.stem}.png", self.layout)
        id_table = lookup_table(MAPILLARY_ID_TO_TRAIN_ID)
        super().__init__(pairs, domain or "mapillary", transform, id_table)
        self.size = size

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image, mask = super().load(index)
        if self.size is None:
            return image, mask
        return resize_and_center_crop(image, mask, self.size)

    def load_mask(self, index: int) -> np.ndarray | None:
        return self.load(index)[1] if self.size is not None else super().load_mask(index)


class SynthiaDataset(SegmentationDataset):
    """SYNTHIA RAND-CITYSCAPES: class ids -> train ids.

    The labels are 16-bit PNGs whose first channel (R, in the file's RGB order) holds the
    class and the second the instance. OpenCV decodes colour in BGR order, so the class is
    OpenCV's channel index 2 (Pillow cannot read 16-bit colour PNGs). ``split="all"`` takes
    every image; any other split reads its image names from ``split_file`` (default
    ``<root>/<split>.txt``).
    """

    layout = "<root>/RGB/*.png and <root>/GT/LABELS/*.png (same names), optional <root>/<split>.txt"

    def __init__(
        self,
        root: str,
        split: str,
        domain: str | None = None,
        transform: Transform | None = None,
        split_file: str | None = None,
    ) -> None:
        root_dir = _require_dir(Path(root), self.layout)
        image_dir = _require_dir(root_dir / "RGB", self.layout)
        label_dir = _require_dir(root_dir / "GT" / "LABELS", self.layout)
        images = _images_in_split(root_dir, image_dir, split, split_file, self.layout)
        pairs = _with_labels(images, lambda image: label_dir / image.name, self.layout)
        id_table = lookup_table(SYNTHIA_ID_TO_TRAIN_ID, size=2**16)
        super().__init__(pairs, domain or "synthia", transform, id_table)

    def read_ids(self, path: Path) -> np.ndarray:
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if label is None:
            raise OSError(f"{path}: cannot decode label image (missing, corrupt or unsupported)")
        return label if label.ndim == 2 else label[:, :, 2]


class ACDCDataset(SegmentationDataset):
    """ACDC (adverse conditions): Cityscapes label ids -> train ids.

    ``condition``: fog, night, rain, snow, or all (the four together); ``split``: train or val
    (test labels are not public).
    """

    layout = (
        "<root>/rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and "
        "<root>/gt/<condition>/<split>/<sequence>/*_gt_labelIds.png"
    )

    def __init__(
        self,
        root: str,
        split: str,
        domain: str | None = None,
        transform: Transform | None = None,
        condition: str = "all",
    ) -> None:
        if condition != "all" and condition not in ACDC_CONDITIONS:
            raise ValueError(
                f"unknown ACDC condition {condition!r}; "
                f"use one of {', '.join(ACDC_CONDITIONS)} or all"
            )
        root_dir = _require_dir(Path(root), self.layout)
        images: list[Path] = []
        for name in ACDC_CONDITIONS if condition == "all" else (condition,):
            image_dir = _require_dir(root_dir / "rgb_anon" / name / split, self.layout)
            _require_dir(root_dir / "gt" / name / split, self.layout)
            images += _list_files(image_dir, "**/*_rgb_anon.png", self.layout)

        def label_for(image: Path) -> Path:
            relative = image.relative_to(root_dir / "rgb_anon")
            stem = relative.name.removesuffix("_rgb_anon.png")
            return root_dir / "gt" / relative.parent / f"{stem}_gt_labelIds.png"

        super().__init__(
            _with_labels(images, label_for, self.layout),
            domain or ("acdc" if condition == "all" else f"acdc-{condition}"),
            transform,
            lookup_table(CITYSCAPES_ID_TO_TRAIN_ID),
        )


class FolderDataset(SegmentationDataset):
    """A folder of images (png, jpg, jpeg, bmp, tif), for predict and custom datasets.

    Images are read from ``<root>/<split>`` (``split=""``: ``root`` itself): every image file
    in it, or those named by ``files``, either a glob pattern relative to that folder
    (``"**/*.jpg"``, ``"street_*"``) or a list of paths relative to it (or absolute). With
    ``mask_root``, every image needs a label image of the same stem and relative subfolder
    (png, bmp or tif) in ``<mask_root>/<split>``, or in ``mask_root`` itself when that has no
    ``<split>`` subfolder; labels are already in train ids 0..18 / 255 (validated). Without
    it, masks are all 255. The domain defaults to the image folder's name.
    """

    layout = (
        "<root>/<split>/*.{png,jpg,jpeg,bmp,tif} (or `files`: a glob or a list), optional "
        "<mask_root>/<split>/<same stem>.png or <mask_root>/<same stem>.png"
    )

    def __init__(
        self,
        root: str,
        split: str = "",
        domain: str | None = None,
        transform: Transform | None = None,
        mask_root: str | None = None,
        files: str | list[str] | None = None,
    ) -> None:
        image_dir = _require_dir(Path(root) / split, self.layout)
        images = self._select(image_dir, files)
        pairs: list[ImageLabelPair] = [(image, None) for image in images]
        if mask_root is not None:
            split_dir = Path(mask_root) / split
            mask_dir = _require_dir(split_dir if split and split_dir.is_dir() else Path(mask_root), self.layout)

            def mask_for(image: Path) -> Path:
                relative = image.relative_to(image_dir) if image.is_relative_to(image_dir) else Path(image.name)
                stem = mask_dir / relative.parent / relative.stem
                found = [stem.with_name(stem.name + suffix) for suffix in LABEL_SUFFIXES
                         if stem.with_name(stem.name + suffix).is_file()]
                return found[0] if found else stem.with_name(stem.name + ".png")

            pairs = _with_labels(images, mask_for, self.layout)
        super().__init__(pairs, domain or image_dir.resolve().name, transform)
        self.names = self._unique_names(image_dir, images)

    def name_of(self, index: int) -> str:
        return self.names[index]

    @staticmethod
    def _unique_names(image_dir: Path, images: list[Path]) -> list[str]:
        """Stems, unless two images share one (``street.jpg``, ``street.png``; or the same name in
        two subfolders): those are named by their path relative to the folder, suffix included,
        so no two predictions are written to one file."""
        stems = [image.stem for image in images]
        clashing = {stem for stem in stems if stems.count(stem) > 1}
        return [
            (image.relative_to(image_dir).as_posix() if image.is_relative_to(image_dir) else str(image))
            if image.stem in clashing else image.stem
            for image in images
        ]

    def _select(self, image_dir: Path, files: str | list[str] | None) -> list[Path]:
        if files is None or isinstance(files, str):
            pattern = files or "*"
            images = sorted(path for path in image_dir.glob(pattern)
                            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(
                    f"no images ({', '.join(IMAGE_SUFFIXES)}) match {image_dir / pattern}\n"
                    f"expected layout: {self.layout}"
                )
            return images
        images = [image_dir / name for name in files]
        missing = [str(image) for image in images if not image.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(images)} listed files are missing, "
                                    f"e.g. {missing[:3]}")
        if not images:
            raise ValueError(f"`files` lists no images for {image_dir}")
        return images


DATASETS: dict[str, type[SegmentationDataset]] = {
    "cityscapes": CityscapesDataset,
    "gtav": GTAVDataset,
    "bdd100k": BDD100KDataset,
    "mapillary": MapillaryDataset,
    "synthia": SynthiaDataset,
    "acdc": ACDCDataset,
    "folder": FolderDataset,
}


def build_dataset(
    name: str,
    root: str,
    split: str,
    domain: str | None = None,
    transform: Transform | None = None,
    **kwargs,
) -> SegmentationDataset:
    """The dataset registered as ``name`` in :data:`DATASETS`, read from ``root``/``split``.

    ``domain`` defaults to the dataset's name; ``kwargs`` go to the dataset class (e.g.
    ``size`` for mapillary, ``condition`` for acdc, ``split_file`` for gtav and synthia,
    ``mask_root`` and ``files`` for folder).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name](root, split, domain=domain, transform=transform, **kwargs)
