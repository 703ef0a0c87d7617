"""Reading images for the models: strict decoding and resizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ImageReadError(OSError):
    """An image file that cannot be decoded (missing, corrupt, truncated)."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as ``uint8 [H, W, 3]``; raise ImageReadError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: a truncated file raises here
            return np.array(im.convert("RGB"))  # a writable copy
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{path}: cannot read image ({e})") from None


def target_size(width: int, height: int, resize) -> tuple[int, int]:
    """The ``(width, height)`` an image is resized to under the ``resize`` option.

    ``None``: unchanged; an int: the longer side becomes that many pixels;
    ``[height, width]``: exactly that size.
    """
    if resize is None:
        return width, height
    if isinstance(resize, int):
        scale = resize / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    h, w = resize
    return int(w), int(h)


def load_uint8(path: str | Path, resize=None) -> torch.Tensor:
    """Read an image as a ``uint8`` tensor ``[3, H, W]``, resized per ``resize``.

    Loaders pass images on as 8 bits (a quarter of the bytes of floats) and convert
    them with :func:`to_float` where the model runs.
    """
    img = read_image(path)
    h, w = img.shape[:2]
    tw, th = target_size(w, h, resize)
    if (tw, th) != (w, h):
        img = np.array(Image.fromarray(img).resize((tw, th), Image.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images to floats in [0, 1] (on the images' device)."""
    return images.float().div_(255.0)


def load_tensor(path: str | Path, resize=None) -> torch.Tensor:
    """Read an image as a float tensor ``[3, H, W]`` in [0, 1], resized per ``resize``."""
    return to_float(load_uint8(path, resize))
