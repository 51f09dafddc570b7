"""Image data sets for GAN training: a zip of images (the ../shared format) and
a synthetic stand-in for smoke runs.

Both yield ``(image, mask)``: the mask is 1 where the image shows what was
photographed and 0 where it was invented (an image's alpha channel; no alpha,
all 1), so the trainer can learn from measured pixels only.

Both index mirrored copies as ``index + len(base)``: a horizontal flip that is a
function of the index, not of a random draw, so the data order (and thus an
exact resume) depends only on the sampler.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from likeness.errors import LikenessError

IMAGE_SUFFIXES = (".webp", ".png", ".jpg", ".jpeg", ".bmp")


def to_tensors(image: Image.Image, resolution: int) -> tuple[Tensor, Tensor]:
    """PIL image → (3, res, res) RGB in [-1, 1] and its (1, res, res) mask in [0, 1]: the
    alpha channel, or all 1 without one; both bicubic if resized (each on its own: PIL
    would premultiply an RGBA image's colours by its alpha)."""
    rgb = image.convert("RGB")
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    if image.size != (resolution, resolution):
        size = (resolution, resolution)
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        alpha = alpha.resize(size, Image.Resampling.BICUBIC) if alpha is not None else None
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1).div(127.5).sub(1.0)
    if alpha is None:
        return x, torch.ones(1, resolution, resolution)
    return x, torch.from_numpy(np.asarray(alpha, dtype=np.float32))[None].div(255.0)


def read_member_list(path: str | Path) -> list[str]:
    """A split file: one member name per line; blank lines and ``#`` comments skipped."""
    lines = Path(path).read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


class ImagesZip(Dataset[tuple[Tensor, Tensor]]):
    """Images stored as members of one zip, read directly (no extraction).

    The zip is opened lazily once per process: a ``ZipFile`` handle shared
    across forked DataLoader workers would race on its file position.
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        members: Sequence[str] | None = None,
        mirror: bool = False,
    ) -> None:
        self.path = Path(path)
        self.resolution = resolution
        self.mirror = mirror
        if not self.path.is_file():
            raise LikenessError("data_not_found", f"no such image zip: {self.path}", status=404)
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
        except zipfile.BadZipFile:
            raise LikenessError("bad_data", f"{self.path} is not a zip file") from None
        if members is not None:
            present = set(names)
            missing = [m for m in members if m not in present]
            if missing:
                raise LikenessError(
                    "bad_split",
                    f"{len(missing)} listed members are not in {self.path.name}, "
                    f"e.g. '{missing[0]}'",
                )
            names = list(members)
        if not names:
            raise LikenessError("bad_data", f"{self.path} holds no images")
        self.names = names
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.names) * (2 if self.mirror else 1)

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        base, flip = index % len(self.names), index >= len(self.names)
        with self._open().open(self.names[base]) as f:
            image = Image.open(io.BytesIO(f.read()))
            image.load()
        x, mask = to_tensors(image, self.resolution)
        return (x.flip(-1), mask.flip(-1)) if flip else (x, mask)

    def __getstate__(self) -> dict:
        # spawned workers get a pickled copy: send the path, not the open handle
        state = self.__dict__.copy()
        state["_zip"], state["_pid"] = None, -1
        return state


class SyntheticImages(Dataset[tuple[Tensor, Tensor]]):
    """Smooth random images (a few soft coloured blobs) for smoke runs and tests,
    every pixel valid.

    Each image is a pure function of (seed, index), so no file is needed and
    runs stay reproducible.
    """

    def __init__(
        self, resolution: int, count: int = 256, seed: int = 0, mirror: bool = False
    ) -> None:
        self.resolution, self.count, self.seed, self.mirror = resolution, count, seed, mirror

    def __len__(self) -> int:
        return self.count * (2 if self.mirror else 1)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        base, flip = index % self.count, index >= self.count
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + base)
        r = self.resolution
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
        x = (torch.rand(3, 1, 1, generator=g) * 2 - 1).expand(3, r, r).clone()
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=g) * 1.2 - 0.6).tolist()
            sy, sx = (torch.rand(2, generator=g) * 0.4 + 0.15).tolist()
            blob = torch.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
            x = x + (torch.rand(3, 1, 1, generator=g) * 2 - 1) * blob
        x = x.clamp(-1, 1)
        return (x.flip(-1) if flip else x), torch.ones(1, r, r)


class StepSampler(Sampler[int]):
    """An endless stream of indices: epoch ``e`` is ``randperm(n)`` seeded by (seed, e).

    Position ``k`` of the stream depends only on (seed, n, k), so starting at
    ``start = step * batch`` resumes exactly where an interrupted run stopped.
    """

    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        self.size, self.seed, self.start = size, seed, start

    def _epoch(self, epoch: int) -> Tensor:
        return torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        )

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            yield from self._epoch(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0
