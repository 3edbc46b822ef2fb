"""Image decoding and CLIP preprocessing: file path or encoded bytes -> NHWC float32.

Evaluation preprocessing reproduces ``transformers.CLIPImageProcessor`` (its PIL backend,
``CLIPImageProcessorPil`` in transformers 5) step for step, so a model converted from
Hugging Face sees the pixels it was trained on:

1. decode, and convert to RGB compositing any transparency onto white
   (``transformers.image_transforms.convert_to_rgb``); EXIF orientation is *not* applied,
   as in transformers;
2. resize the shortest side to ``image_size`` with PIL bicubic on the uint8 image; the long
   side becomes ``int(image_size * long / short)`` (truncated, as in
   ``transformers.image_transforms.get_resize_output_image_size``);
3. center crop ``image_size x image_size`` with the top-left corner at
   ``((h - image_size) // 2, (w - image_size) // 2)`` (``image_transforms.center_crop``;
   torchvision, used by openai/CLIP, rounds instead, a one-pixel shift when the
   difference is odd);
4. scale to [0, 1] and normalise with ``OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``.

Training may replace steps 2-3 with a random resized crop and a horizontal flip
(``Augment``), both driven by a ``numpy.random.Generator`` supplied per sample so the
result is a deterministic function of the pipeline seed.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

import numpy as np
from PIL import Image

# Per-channel RGB mean / std of the CLIP training images, on the [0, 1] scale.
# Source: openai/CLIP clip/clip.py `_transform` (Normalize(...)); the same numbers are
# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD used by CLIPImageProcessor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.asarray(OPENAI_CLIP_MEAN, np.float32)
_STD = np.asarray(OPENAI_CLIP_STD, np.float32)


class ImageDecodeError(ValueError):
    """An image could not be read or decoded (missing, corrupt, truncated, not an image)."""


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation: random resized crop, then an optional horizontal flip.

    Attributes:
      scale: range of the crop area as a fraction of the image area. Default (0.9, 1.0)
        is open_clip's training ``RandomResizedCrop`` scale (open_clip/transform.py,
        ``image_transform(is_train=True)``), a mild crop that keeps captioned objects.
      ratio: range of the crop aspect ratio w/h, sampled log-uniformly (torchvision's
        ``RandomResizedCrop`` default, (3/4, 4/3)).
      hflip: flip left/right with probability 0.5. Off by default: flipping makes
        captions such as "on the left" wrong.
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False


def decode_image(image: str | os.PathLike | bytes) -> Image.Image:
    """Fully decode an image file or encoded bytes into an RGB ``PIL.Image``.

    Transparency (alpha band or palette transparency) is composited onto white, as
    ``transformers.image_transforms.convert_to_rgb`` does.

    Raises:
      ImageDecodeError: the file is missing or unreadable, or the data is corrupt,
        truncated or not an image. (PIL's ``LOAD_TRUNCATED_IMAGES`` is left off, so a
        truncated JPEG raises instead of yielding grey pixels.)
    """
    what = f"{len(image)} bytes" if isinstance(image, bytes | bytearray) else repr(str(image))
    try:
        src = io.BytesIO(image) if isinstance(image, bytes | bytearray) else image
        with Image.open(src) as im:
            im.load()  # decode everything now: truncation raises here, not later
            if "A" in im.getbands() or im.info.get("transparency") is not None:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"cannot decode image {what}: {type(e).__name__}: {e}") from e


def resize_shortest_side(img: Image.Image, size: int) -> Image.Image:
    """Resize with PIL bicubic so the shorter side is ``size`` (aspect ratio kept).

    The longer side becomes ``int(size * long / short)``, exactly as
    ``transformers.image_transforms.get_resize_output_image_size(default_to_square=False)``.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size x size`` window; top-left at ``((h-size)//2, (w-size)//2)``.

    Raises:
      ValueError: the image is smaller than ``size`` on either side.
    """
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(
    img: Image.Image, size: int, rng: np.random.Generator, augment: Augment
) -> Image.Image:
    """Random crop of random area and aspect ratio, resized to ``size x size`` (bicubic).

    The sampling follows torchvision's ``RandomResizedCrop.get_params``: up to 10 tries
    of (area fraction ~ U(scale), log aspect ~ U(log ratio)); if none fits, the largest
    central crop with the aspect ratio clamped to ``ratio``.
    """
    w, h = img.size
    area = w * h
    log_lo, log_hi = math.log(augment.ratio[0]), math.log(augment.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*augment.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            break
    else:  # fallback: central crop
        in_ratio = w / h
        if in_ratio < augment.ratio[0]:
            cw, ch = w, int(round(w / augment.ratio[0]))
        elif in_ratio > augment.ratio[1]:
            cw, ch = int(round(h * augment.ratio[1])), h
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    return img.resize(
        (size, size), resample=Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch)
    )


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` RGB -> float32 ``(x / 255 - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD``."""
    x = np.asarray(pixels, np.float32) * np.float32(1 / 255)
    return (x - _MEAN) / _STD


def preprocess_image(
    img: Image.Image,
    image_size: int,
    *,
    augment: Augment | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """CLIP preprocessing of a decoded RGB image.

    Args:
      img: RGB ``PIL.Image`` (from ``decode_image``).
      image_size: output side in pixels.
      augment: ``None`` for evaluation preprocessing (resize shortest side + center crop,
        identical to ``CLIPImageProcessor``); otherwise random resized crop (+ flip).
      rng: per-sample generator; required when ``augment`` is given.

    Returns:
      float32 ``[image_size, image_size, 3]`` (HWC), CLIP-normalised.

    Raises:
      ValueError: ``augment`` given without ``rng``.
    """
    if augment is None:
        img = center_crop(resize_shortest_side(img, image_size), image_size)
        return normalize(np.asarray(img))
    if rng is None:
        raise ValueError("preprocess_image: augment needs a per-sample rng")
    img = random_resized_crop(img, image_size, rng, augment)
    pixels = np.asarray(img)
    if augment.hflip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return normalize(pixels)


def load_image(
    image: str | os.PathLike | bytes,
    image_size: int,
    *,
    augment: Augment | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``decode_image`` then ``preprocess_image``: float32 ``[image_size, image_size, 3]``.

    Raises:
      ImageDecodeError: as ``decode_image``.
    """
    return preprocess_image(decode_image(image), image_size, augment=augment, rng=rng)
