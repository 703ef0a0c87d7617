"""The image loader of every model stage: a torch DataLoader over a dataset's images by name.

Decoding runs in worker processes (overlapping the model's work); an unreadable image
comes back as an error in its batch (:class:`Batch`), so the stage marks or lists it
instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .images import ImageReadError, load_uint8_sized


class ImageList(Dataset):
    """Images (``uint8 [3, H, W]``) of a dataset by relative name; unreadable ones come back as errors."""

    def __init__(self, root: Path, names: list[str], resize=None, resize_max: int | None = None):
        self.root, self.names, self.resize, self.resize_max = Path(root), names, resize, resize_max

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        """``(i, image, the file's upright (width, height), None)`` or ``(i, None, None, error)``."""
        try:
            image, original = load_uint8_sized(self.root / self.names[i], self.resize, self.resize_max)
            return i, image, original, None
        except ImageReadError as e:
            return i, None, None, str(e)


@dataclass
class Batch:
    """A loader batch: the readable images (stacked when they share a size) and the errors."""

    size: int  # images asked for, readable or not
    idx: list[int]
    images: torch.Tensor | list[torch.Tensor] | None
    errors: list[tuple[int, str]]
    #: each readable image's file size (upright width, height), before any resizing
    original_sizes: list[tuple[int, int]] | None = None

    def pin_memory(self):  # called by the DataLoader's pinning thread when pin_memory=True
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        return self


def _collate(batch) -> Batch:
    # runs in the loader's worker: stacking there sends one shared-memory block per batch
    ok = [(i, t, size) for i, t, size, _ in batch if t is not None]
    tensors = [t for _, t, _ in ok]
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        images = torch.stack(tensors)
    else:
        images = tensors or None
    return Batch(len(batch), [i for i, _, _ in ok], images, [(i, e) for i, t, _, e in batch if t is None],
                 [size for _, _, size in ok])


def image_loader(root, names, resize, batch_size, num_workers, pin_memory=False, resize_max=None) -> DataLoader:
    return DataLoader(
        ImageList(root, names, resize, resize_max), batch_size=batch_size, num_workers=num_workers,
        collate_fn=_collate, shuffle=False, pin_memory=pin_memory,
    )
