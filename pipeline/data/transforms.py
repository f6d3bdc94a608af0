"""The image and label transforms shared by every stage.

Geometry follows the STEGO-family protocol (docs/method.md §1): resize the shorter side to the crop size,
then take the central square, with bilinear resampling for images and nearest for labels so that
labels never gain values. Sizes and crop offsets follow torchvision's ``Resize(int)`` +
``CenterCrop`` on PIL images (longer side truncated, offset rounded), which the reference
preprocessing used, so crops line up pixel for pixel with the official ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_shorter_center_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Scale ``image`` so its shorter side is ``size`` (aspect kept); cut the central size×size square."""
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    resized = image.resize((new_width, new_height), resample=resample)
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    return resized.crop((left, top, left + size, top + size))


def prepare_crop(image: Image.Image, size: int) -> np.ndarray:
    """The backbone's view of an image: uint8 size×size×3, bilinear resize + centre crop."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.array(resize_shorter_center_crop(rgb, size, Image.Resampling.BILINEAR), dtype=np.uint8)


def prepare_label(label: np.ndarray, size: int) -> np.ndarray:
    """The label map matching ``prepare_crop``: uint8 size×size, nearest resize + centre crop."""
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label must be a uint8 H×W array, got {label.dtype} {label.shape}")
    image = Image.fromarray(label)
    return np.array(resize_shorter_center_crop(image, size, Image.Resampling.NEAREST), dtype=np.uint8)


def normalize_crops(crops: np.ndarray) -> torch.Tensor:
    """uint8 B×H×W×3 crops → float32 B×3×H×W backbone input: [0, 1], then ImageNet mean/std."""
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be uint8 B×H×W×3, got {crops.dtype} {crops.shape}")
    pixels = torch.from_numpy(np.array(crops, copy=True)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels - mean) / std).contiguous()


@dataclass(frozen=True)
class PhotometricAugmentation:
    """PriMaPs-EM's student-view augmentation (docs/method.md §4).

    Gaussian blur with σ drawn from ``blur_sigma`` is always applied; then colour jitter with
    probability ``jitter_p`` (brightness, contrast, saturation and hue, each of strength
    ``jitter_strength``), otherwise grayscale with probability ``grayscale_p``.
    """

    blur_sigma: tuple[float, float] = (0.1, 2.0)
    jitter_p: float = 0.15
    jitter_strength: float = 0.1
    grayscale_p: float = 0.05


def photometric_view(
    crop: np.ndarray, rng: np.random.Generator, aug: PhotometricAugmentation = PhotometricAugmentation()
) -> np.ndarray:
    """A photometrically augmented copy of a uint8 H×W×3 crop; geometry is untouched.

    Every random choice is drawn from ``rng``, so equal generator states give equal views. Colour
    jitter follows torchvision's ``ColorJitter`` semantics: factors drawn uniformly from
    [1 − s, 1 + s] (hue shift from [−s, s] of a full turn), the four adjustments in random order.
    """
    if crop.ndim != 3 or crop.shape[-1] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"crop must be uint8 H×W×3, got {crop.dtype} {crop.shape}")
    sigma = rng.uniform(*aug.blur_sigma)
    view = Image.fromarray(crop).filter(ImageFilter.GaussianBlur(radius=sigma))
    if rng.random() < aug.jitter_p:
        view = _colour_jitter(view, rng, aug.jitter_strength)
    elif rng.random() < aug.grayscale_p:
        view = view.convert("L").convert("RGB")
    return np.array(view, dtype=np.uint8)


def _colour_jitter(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    for adjustment in rng.permutation(4):
        if adjustment == 0:
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - strength, 1 + strength))
        elif adjustment == 1:
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - strength, 1 + strength))
        elif adjustment == 2:
            image = ImageEnhance.Color(image).enhance(rng.uniform(1 - strength, 1 + strength))
        else:
            image = _shift_hue(image, rng.uniform(-strength, strength))
    return image


def _shift_hue(image: Image.Image, turns: float) -> Image.Image:
    """Rotate every pixel's hue by ``turns`` of the colour wheel (PIL's HSV hue spans 0..255)."""
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(turns * 255))) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")
