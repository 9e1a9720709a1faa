"""Joint transforms of (image, target) pairs, after torchvision's ``references/segmentation``.

Images are HxWx3 uint8 RGB arrays and targets HxW uint8 class maps until ``ToTensor``; targets
are always resized with nearest-neighbour interpolation and padded with the ignore index.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from flowcloud.inference import IMAGENET_MEAN, IMAGENET_STD
from flowcloud.labels import IGNORE_INDEX

Pair = tuple[np.ndarray, np.ndarray]


class Compose:
    def __init__(self, transforms: Sequence[object]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, target: np.ndarray) -> tuple[object, object]:
        pair: tuple[object, object] = (image, target)
        for t in self.transforms:
            pair = t(*pair)  # type: ignore[operator]
        return pair


def _resize(image: np.ndarray, target: np.ndarray, height: int, width: int) -> Pair:
    size = (width, height)
    if image.shape[:2] == (height, width):
        return image, target
    shrink = height < image.shape[0]
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return image, cv2.resize(target, size, interpolation=cv2.INTER_NEAREST)


class Resize:
    """Resize to a fixed (height, width)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image: np.ndarray, target: np.ndarray) -> Pair:
        return _resize(image, target, *self.size)


class RandomScale:
    """Scale both sides by a factor drawn uniformly from ``[low, high]`` (of a base size, if given)."""

    def __init__(self, low: float, high: float, base: tuple[int, int] | None = None) -> None:
        if not 0 < low <= high:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got {low}, {high}")
        self.low, self.high, self.base = low, high, base

    def __call__(self, image: np.ndarray, target: np.ndarray) -> Pair:
        factor = random.uniform(self.low, self.high)
        h, w = self.base or image.shape[:2]
        return _resize(image, target, max(1, round(h * factor)), max(1, round(w * factor)))


class RandomCrop:
    """A random (height, width) crop; smaller inputs are first padded (image 0, target ignore)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image: np.ndarray, target: np.ndarray) -> Pair:
        ch, cw = self.size
        h, w = target.shape
        if h < ch or w < cw:
            pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            target = cv2.copyMakeBorder(target, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
            h, w = target.shape
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        return image[top : top + ch, left : left + cw], target[top : top + ch, left : left + cw]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, target: np.ndarray) -> Pair:
        if random.random() < self.p:
            return image[:, ::-1], target[:, ::-1]
        return image, target


class ColorJitter:
    """Random brightness, contrast, saturation and hue (image only)."""

    def __init__(
        self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.03
    ) -> None:
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, image: np.ndarray, target: np.ndarray) -> Pair:
        img = image.astype(np.float32)
        img *= random.uniform(1 - self.brightness, 1 + self.brightness)
        mean = img.mean()
        img = (img - mean) * random.uniform(1 - self.contrast, 1 + self.contrast) + mean
        grey = img.mean(axis=2, keepdims=True)
        img = (img - grey) * random.uniform(1 - self.saturation, 1 + self.saturation) + grey
        out = np.clip(img, 0, 255).astype(np.uint8)
        if self.hue > 0:
            hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
            shift = round(random.uniform(-self.hue, self.hue) * 180)
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return out, target


class RandomJpeg:
    """JPEG-compress the image at a random quality with probability ``p`` (codec-like artifacts)."""

    def __init__(self, quality: tuple[int, int] = (25, 95), p: float = 0.5) -> None:
        self.quality, self.p = quality, p

    def __call__(self, image: np.ndarray, target: np.ndarray) -> Pair:
        if random.random() >= self.p:
            return image, target
        quality = random.randint(*self.quality)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
        if decoded is None:
            return image, target
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), target


class RandomBlur:
    """Gaussian blur with a random sigma with probability ``p`` (focus, motion, down-and-up scaling)."""

    def __init__(self, sigma: tuple[float, float] = (0.3, 1.2), p: float = 0.3) -> None:
        self.sigma, self.p = sigma, p

    def __call__(self, image: np.ndarray, target: np.ndarray) -> Pair:
        if random.random() >= self.p:
            return image, target
        return cv2.GaussianBlur(image, (0, 0), random.uniform(*self.sigma)), target


class ToTensor:
    """HxWx3 uint8 to a 3xHxW float tensor in [0, 1]; the target to an int64 HxW tensor."""

    def __call__(self, image: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        return img, torch.from_numpy(np.ascontiguousarray(target)).long()


class Normalize:
    """ImageNet normalisation, the same as ``flowcloud.inference.Segmenter`` applies."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (image - self.mean) / self.std, target
