"""Image classification data held in memory as uint8 ``[N, H, W, C]`` tensors.

- ``digits``: scikit-learn's handwritten digits (1797 8x8 grey images, shipped with
  scikit-learn: nothing is downloaded), upscaled to ``image_size``, with a fixed stratified
  80/20 train/test split.
- ``folder:PATH``: one sub-folder per class, images read with Pillow, converted to RGB and
  resized to ``image_size`` x ``image_size``. When PATH holds ``train/`` and ``test/``
  (each with the class sub-folders) those are the split; otherwise a fixed 80/20 split per
  class.

A batch is returned as ``images.permute(0, 3, 1, 2)``: a channels_last view of the NHWC
bytes, which msfast's pyramid reads in place (it also normalizes, inside the kernel).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

__all__ = ["ImageData", "load", "load_image", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_SEED = 0  # the train/test split is fixed, whatever the training seed
TEST_FRACTION = 0.2


@dataclasses.dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, H, W, C]
    labels: torch.Tensor  # int64 [N]
    classes: list

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def batch(self, idx, device="cpu", channels_last: bool = True):
        """uint8 images [B, C, H, W] (channels_last, or NCHW-contiguous) and int64 labels."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.images[idx].to(device, non_blocking=True).permute(0, 3, 1, 2)
        if not channels_last:
            x = x.contiguous()
        return x, self.labels[idx].to(device, non_blocking=True)

    def mean_std(self) -> tuple[list, list]:
        """Per-channel mean and standard deviation of the pixels, in [0, 1] units."""
        x = self.images.reshape(-1, self.channels).double() / 255
        return x.mean(0).tolist(), x.std(0).clamp_min(1e-3).tolist()


def load(spec: str, image_size: int) -> tuple[ImageData, ImageData]:
    """(train, test) of a dataset spec: ``"digits"`` or ``"folder:PATH"``."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"msfast: --image-size must be a positive int, got {image_size!r}")
    if spec == "digits":
        return _digits(image_size)
    if isinstance(spec, str) and spec.startswith("folder:"):
        return _folder(spec[len("folder:"):], image_size)
    raise ValueError(f"msfast: --data: unknown dataset {spec!r}; use 'digits' or 'folder:PATH'")


def _split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stratified split: in every class, a seeded shuffle puts 20% in the test set."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(TEST_FRACTION * len(idx)) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _digits(image_size: int) -> tuple[ImageData, ImageData]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] * (255 / 16)  # [N, 1, 8, 8], ink 0..16
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=image_size < 8)
    images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    labels = torch.as_tensor(d.target, dtype=torch.long)
    tr, te = _split(labels)
    classes = [str(c) for c in d.target_names]
    return ImageData(images[tr], labels[tr], classes), ImageData(images[te], labels[te], classes)


def load_image(path: str, image_size: int, channels: int = 3) -> torch.Tensor:
    """One image file as uint8 [image_size, image_size, channels] (Pillow, bilinear resize)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"msfast: image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except OSError as e:
        raise ValueError(f"msfast: cannot read image {path!r}: {e}") from e
    return t.reshape(image_size, image_size, channels)


def _class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _read_classes(root: str, classes: list, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for f in sorted(os.listdir(folder)):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                images.append(load_image(os.path.join(folder, f), image_size, 3))
                labels.append(label)
    if not images:
        raise ValueError(f"msfast: --data: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root!r}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _folder(path: str, image_size: int) -> tuple[ImageData, ImageData]:
    if not path or not os.path.isdir(path):
        raise ValueError(f"msfast: --data: folder {path!r} does not exist")
    tr_dir, te_dir = os.path.join(path, "train"), os.path.join(path, "test")
    if os.path.isdir(tr_dir) and os.path.isdir(te_dir):
        classes = _class_folders(tr_dir)
        if not classes:
            raise ValueError(f"msfast: --data: {tr_dir!r} has no class sub-folders")
        extra = sorted(set(_class_folders(te_dir)) - set(classes))
        if extra:
            raise ValueError(f"msfast: --data: test classes {extra} are not among the train classes of {tr_dir!r}")
        xtr, ytr = _read_classes(tr_dir, classes, image_size)
        xte, yte = _read_classes(te_dir, classes, image_size)
        return ImageData(xtr, ytr, classes), ImageData(xte, yte, classes)
    classes = _class_folders(path)
    if len(classes) < 2:
        raise ValueError(f"msfast: --data: {path!r} needs one sub-folder per class (at least two), found {classes}")
    x, y = _read_classes(path, classes, image_size)
    tr, te = _split(y)
    return ImageData(x[tr], y[tr], classes), ImageData(x[te], y[te], classes)
