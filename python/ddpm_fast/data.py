"""Training data: a folder of images, or the built-in ``digits``.

Both load fully into memory as one float32 tensor ``(N, C, H, W)`` scaled to ``[-1, 1]``: the data sets this
package trains on (scikit-learn's 1,797 digits, small image folders) are a few MB, and an in-memory tensor keeps
batch sampling exact and resumable with a single ``torch.Generator``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS = "digits"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: images ``(1797, 8, 8)`` in ``[0, 16]`` and labels ``(1797,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the built-in 'digits' data needs scikit-learn: `pip install scikit-learn`") from None
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def upscale_digits(images_0_16: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """8×8 digits in ``[0, 16]`` → ``(N, 1, resolution, resolution)`` in ``[-1, 1]`` (bilinear upscaling)."""
    x = torch.as_tensor(np.asarray(images_0_16, dtype=np.float32)).reshape(-1, 1, 8, 8) / 16.0
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def load_digits_tensor(resolution: int = 16) -> torch.Tensor:
    """All 1,797 digits as a training tensor ``(1797, 1, resolution, resolution)`` in ``[-1, 1]``."""
    images, _ = load_digits_arrays()
    return upscale_digits(images, resolution)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, chosen by extension."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"--data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"--data {str(root)!r} is not a folder (pass a folder of images or 'digits')")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"--data folder {str(root)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _load_image(path: Path, resolution: int, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            # Centre-crop to a square, then resize: keeps aspect ratio like diffusers' training example.
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--data: cannot read image {str(path)!r} ({e})") from None
    return arr.reshape(resolution, resolution, -1)


def load_image_folder(folder: str | os.PathLike, resolution: int, channels: int | None = None) -> torch.Tensor:
    """Every image under ``folder`` as ``(N, C, resolution, resolution)`` in ``[-1, 1]``.

    ``channels`` 1 (grayscale) or 3 (RGB); ``None`` picks 1 when every image is grayscale, else 3.
    """
    from PIL import Image

    files = list_image_files(folder)
    if channels is None:
        channels = 1
        for f in files:
            try:
                with Image.open(f) as im:
                    if im.mode not in ("1", "L", "I", "I;16", "F", "LA"):
                        channels = 3
                        break
            except OSError:
                raise ValueError(f"--data: cannot read image {str(f)!r}") from None
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    arrays = [_load_image(f, resolution, mode) for f in files]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (x * 2 - 1).contiguous()


def load_training_data(data: str | os.PathLike, resolution: int, channels: int | None = None) -> torch.Tensor:
    """``data`` is ``"digits"`` or a folder of images; returns ``(N, C, H, W)`` float32 in ``[-1, 1]``."""
    if not isinstance(resolution, int) or resolution < 4:
        raise ValueError(f"--resolution must be an integer >= 4, got {resolution!r}")
    if os.fspath(data) == DIGITS and not os.path.exists(DIGITS):
        if channels not in (None, 1):
            raise ValueError(f"the built-in 'digits' are grayscale: --channels must be 1, got {channels}")
        return load_digits_tensor(resolution)
    return load_image_folder(data, resolution, channels)
