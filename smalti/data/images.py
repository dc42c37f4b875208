"""An image-classification task that runs offline: scikit-learn's bundled handwritten digits.

The vision efficiency methods (BlurPool, MixUp, progressive resizing, ...)
need an image task, and tests and benchmarks must never download one. The
1,797 8x8 digits ship inside scikit-learn's wheel; upsampled to 32x32 they
make a small but honest task for a small ResNet (seconds per epoch on CPU).

Each digit's label is also its provenance class (``digits/3``), so routing,
the ledger and deletion work on images exactly as on text: a MixUp of a 3
and a 7 belongs to both ``digits/3`` and ``digits/7``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from smalti.core.batch import Batch
from smalti.data.lm import LanguageModelData, OrderConfig
from smalti.errors import DataError
from smalti.trust.taxonomy import Taxonomy

DIGIT_CLASSES = [f"digits/{d}" for d in range(10)]


class ImageExamples:
    """Images [N, C, H, W] (float, in [0, 1]) with integer labels; the label is the provenance class."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor | None = None) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images must be [N, C, H, W] with one label each, got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images.contiguous()
        self.labels = labels.long()
        self.classes = self.labels if classes is None else classes.long()  # a taxonomy's class of each image
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        if classes is not None:  # governed: which class each image is counts too
            digest.update(self.classes.numpy().tobytes())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return int(self.labels.numel())

    def close(self) -> None:
        """Nothing to release (the images are in memory); a source's interface."""

    def gather(self, indices: torch.Tensor) -> Batch:
        return Batch(
            inputs=self.images[indices],
            targets=self.labels[indices],
            sample_ids=indices,
            provenance=self.classes[indices].unsqueeze(1),
        )


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8-range floats [N, 8, 8] and labels [N], from scikit-learn's wheel (no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.images 'digits' needs scikit-learn: pip install 'smalti[vision]'") from None
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digit_classes(taxonomy: Taxonomy, where: object) -> torch.Tensor:
    """Each digit's class index in a signed taxonomy [10].

    Governing the digits (a policy, deletion) needs their classes in a signed taxonomy: each digit is the one
    leaf class whose last segment is the digit (``digits/3``; ``digits/odd/3`` groups them, and a policy or a
    deletion can then name a group by its node)."""
    leaves = [c for c in taxonomy.classes if not any(o.startswith(c + "/") for o in taxonomy.classes)]
    indices = []
    for digit in range(10):
        named = [c for c in leaves if c.rsplit("/", 1)[-1] == str(digit)]
        if len(named) != 1:
            raise DataError(
                f"data.taxonomy {where}: the digits need one leaf class per digit, ending in the digit (e.g. "
                f"digits/{digit}, or digits/odd/{digit} to group them); digit {digit} has "
                f"{len(named) and ', '.join(named) or 'none'}"
            )
        indices.append(taxonomy.index(named[0]))
    return torch.tensor(indices)


def digits_data(
    order: OrderConfig, image_size: int = 32, val_every: int = 5, taxonomy: Taxonomy | None = None
) -> LanguageModelData:
    """Digits upsampled (bilinear) to ``image_size``; every ``val_every``-th example is held out. With a signed
    ``taxonomy`` (already verified), each digit's class is its leaf there (``digit_classes``); the targets stay
    the digits."""
    if image_size < 8:
        raise DataError(f"data.image_size must be at least 8 (the digits are 8x8), got {image_size}")
    images, labels = load_digits_arrays()
    pixels = torch.from_numpy(images / 16.0).unsqueeze(1)  # the digits' pixel values are 0..16
    if image_size != 8:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    pixels = pixels.clamp(0.0, 1.0)
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    held_out[::val_every] = True
    targets = torch.from_numpy(labels)
    classes = targets if taxonomy is None else digit_classes(taxonomy, "")[targets]
    return LanguageModelData(
        train=ImageExamples(pixels[~held_out], targets[~held_out], classes[~held_out]),
        val=ImageExamples(pixels[held_out], targets[held_out], classes[held_out]),
        tokenizer=None,
        class_names=list(taxonomy.classes) if taxonomy is not None else list(DIGIT_CLASSES),
        order=order,
        provenance={"source": "images", "images": "digits", "image_size": image_size},
        taxonomy=taxonomy,
    )
