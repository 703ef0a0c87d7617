"""Reading images for the models: strict decoding and resizing.

Every stage reads images through :func:`read_image` (and the index stage checks them
with :func:`image_size`): an image with more than :func:`max_pixels` pixels (from its
header, before anything is decoded) is refused as too large, PIL's decompression-bomb
guard included, so one hostile or giant file is skipped and listed instead of taking
the machine's memory. The limit is the config's ``max_pixels`` (the CLI's
``--max-pixels``, passed to worker processes as ``VG_MAX_PIXELS``); PIL's own guard
against decompression bombs (179 megapixels) applies on top.

EXIF orientation: images are used as they are meant to be seen. A photo whose EXIF
``Orientation`` tag says it is stored rotated or mirrored (phone photos, Flickr copies)
is turned upright on reading (``ImageOps.exif_transpose``), and every size this package
reports (the index's width/height, the feature store's ``original_size``) is the upright
one, so keypoints are in the upright image's pixels. The VG benchmarks' images carry no
orientation tag: nothing changes for them. (OpenCV's ``imread``, used by the reports,
applies the tag too.)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

#: the default limit: 100 megapixels, above any camera's photo (a 14000 x 13000 JPEG is 182)
#: the ImageNet normalisation (torchvision's) every ImageNet-pretrained backbone here expects
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_MAX_PIXELS = 100_000_000
# max_pixels is the limit here: PIL's warning from 89 MP on would only add noise (its error
# from 179 MP on stays, reported as a decompression bomb)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
ENV_MAX_PIXELS = "VG_MAX_PIXELS"


class ImageReadError(OSError):
    """An image file that cannot be decoded (missing, corrupt, truncated, too large)."""


def max_pixels() -> int:
    """The pixel limit: ``VG_MAX_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`."""
    value = os.environ.get(ENV_MAX_PIXELS)
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{ENV_MAX_PIXELS}={value!r} is not a whole number of pixels") from None
    if n < 1:
        raise ValueError(f"{ENV_MAX_PIXELS}={value!r} must be positive")
    return n


def set_max_pixels(n: int) -> None:
    """Set the limit for this process and the processes it starts."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_pixels must be a positive integer, not {n!r}")
    os.environ[ENV_MAX_PIXELS] = str(n)


def _open_checked(path) -> Image.Image:
    """``Image.open`` (header only) refusing images over the pixel limit."""
    limit = max_pixels()
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:  # PIL's own guard (179 MP) applies as well
        raise ImageReadError(f"{path}: image too large, a decompression bomb ({e}); not decoded") from None
    w, h = im.size
    if w * h > limit:
        im.close()
        raise ImageReadError(f"{path}: image too large ({w} x {h} = {w * h:,} pixels, more than max_pixels "
                             f"{limit:,}); not decoded")
    return im


#: EXIF Orientation values that store the image transposed (width and height swapped)
TRANSPOSED = (5, 6, 7, 8)


def upright_size(im: Image.Image) -> tuple[int, int]:
    """An opened image's ``(width, height)`` after its EXIF orientation is applied."""
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: PIL's exif_transpose ignores it too
        orientation = None
    return (h, w) if orientation in TRANSPOSED else (w, h)


def image_size(path: str | Path) -> tuple[int, int, str | None]:
    """``(width, height, format)`` from the header, upright (EXIF orientation applied);
    ImageReadError naming the file if it is not an image or is over the pixel limit."""
    try:
        with _open_checked(path) as im:
            return (*upright_size(im), im.format)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: unreadable image ({e})") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as ``uint8 [H, W, 3]``; raise ImageReadError naming the file."""
    try:
        with _open_checked(path) as im:
            im.load()  # decodes fully: a truncated file raises here
            im = ImageOps.exif_transpose(im)  # upright, as the photo is meant to be seen
            return np.array(im.convert("RGB"))  # a writable copy
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot read image ({e})") from None


def target_size(width: int, height: int, resize, resize_max: int | None = None) -> tuple[int, int]:
    """The ``(width, height)`` an image is resized to under the ``resize`` and ``resize_max`` options.

    ``resize``: ``None``: unchanged; an int: the longer side becomes that many pixels
    (smaller images are enlarged); ``[height, width]``: exactly that size.
    ``resize_max`` (hloc's option of that name): then, if the longer side exceeds it, the
    image is shrunk (aspect kept) so that it does not; never enlarged. Every local
    extractor has a default ``resize_max``, so a 12-megapixel photo is never described at
    full resolution by accident.
    """
    if resize is None:
        tw, th = width, height
    elif isinstance(resize, int) and not isinstance(resize, bool):
        scale = resize / max(width, height)
        tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    else:
        h, w = resize
        tw, th = int(w), int(h)
    if resize_max is not None:
        if isinstance(resize_max, bool) or not isinstance(resize_max, int) or resize_max < 1:
            raise ValueError(f"resize_max must be a positive integer (pixels of the longer side) or None, "
                             f"not {resize_max!r}")
        if max(tw, th) > resize_max:
            scale = resize_max / max(tw, th)
            tw, th = max(1, round(tw * scale)), max(1, round(th * scale))
    return tw, th


def load_uint8(path: str | Path, resize=None, resize_max: int | None = None) -> torch.Tensor:
    """Read an image as a ``uint8`` tensor ``[3, H, W]``, resized per ``resize`` / ``resize_max``
    (:func:`target_size`).

    Loaders pass images on as 8 bits (a quarter of the bytes of floats) and convert
    them with :func:`to_float` where the model runs.
    """
    return load_uint8_sized(path, resize, resize_max)[0]


def load_uint8_sized(path: str | Path, resize=None, resize_max: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`load_uint8` and the file's own ``(width, height)`` (to map positions found in
    the resized image back to the original's, :func:`to_original_frame`)."""
    img = read_image(path)
    h, w = img.shape[:2]
    tw, th = target_size(w, h, resize, resize_max)
    if (tw, th) != (w, h):
        img = np.array(Image.fromarray(img).resize((tw, th), Image.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), (w, h)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images to floats in [0, 1] (on the images' device)."""
    return images.float().div_(255.0)


def load_tensor(path: str | Path, resize=None, resize_max: int | None = None) -> torch.Tensor:
    """Read an image as a float tensor ``[3, H, W]`` in [0, 1], resized per ``resize`` / ``resize_max``."""
    return to_float(load_uint8(path, resize, resize_max))


def to_original_frame(points, described: tuple, original: tuple):
    """Pixel positions ``[N, 2]`` (x, y) in an image resized to ``described = (w, h)`` ->
    the same positions in the ``original = (w, h)`` image.

    Pixel centres are at integer coordinates in both frames (hloc's convention:
    ``(x + 0.5) * scale - 0.5``), so a keypoint at the centre of a pixel of the resized
    image lands on the centre of the region that pixel covers. Computed in float64; the
    positions come back unchanged (same array) when the sizes are equal."""
    if tuple(int(v) for v in described) == tuple(int(v) for v in original):
        return points
    sx, sy = original[0] / described[0], original[1] / described[1]
    out = np.array(points, np.float64)
    out[..., 0] = (points[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (points[..., 1] + 0.5) * sy - 0.5
    return out


def to_described_frame(points, described: tuple, original: tuple):
    """The inverse of :func:`to_original_frame`: original-image pixels -> pixels of the image
    the model described (for scorers whose thresholds are in the model's frame)."""
    if tuple(int(v) for v in described) == tuple(int(v) for v in original):
        return points
    sx, sy = original[0] / described[0], original[1] / described[1]
    out = np.array(points, np.float64)
    out[..., 0] = (points[..., 0] + 0.5) / sx - 0.5
    out[..., 1] = (points[..., 1] + 0.5) / sy - 0.5
    return out
