"""The sample job: per-image seeds, fixed batches, atomic PNG writing, an optional grid.

Seeds. Image ``i`` of a run with seed ``s`` draws all its noise (the initial sample and every DDPM step) from
its own CPU ``torch.Generator`` seeded with :func:`image_seed` ``(s, i)`` =
``numpy.random.SeedSequence([s, i]).generate_state(1, dtype=uint64)[0]``. The pipeline gets a *list* of
generators, one per image of the batch, and draws per-image noise from each, so image ``i`` starts from the
same noise whatever the batch size, the batch it falls in, the process count or the device (generators live on
the CPU; noise is moved to the device after drawing). Pixels then agree up to floating-point rounding of the
batched UNet (see docs/training.md for the measured difference).

Batches are fixed: batch ``b`` holds images ``[b*B, min((b+1)*B, N))`` — :func:`batch_indices`. Under torchrun,
:func:`sample_sharded` gives whole batches to ranks round-robin, so a batch's members (and so its pixels, given
the same ``--num-threads``: CPU reductions split work by thread count) never depend on the world size.
:func:`write_npz` then packs every PNG, in index order, into the ``arr_0`` array FID tools read.

Files. Every file is written to a temp file in the target's folder and renamed over the target, so a crash leaves
the old file or the whole new one; the new file gets the permissions a plain ``open(path, "w")`` would give
(``0o666`` less the umask), not ``tempfile.mkstemp``'s ``0o600``. :func:`damaged_images` decodes every existing
image for ``--resume``, which samples the damaged ones again.
"""

from __future__ import annotations

import errno
import math
import os
import re
import secrets
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

PNG_NAME = "{index:06d}.png"
GRID_NAME = "grid.png"


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image ``index`` in a run seeded with ``seed`` (both non-negative)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def image_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per image index (CPU so that every device starts from the same noise)."""
    return [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in indices]


def image_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / PNG_NAME.format(index=index)


def batch_indices(num_images: int, batch_size: int) -> list[list[int]]:
    """The fixed batches: batch ``b`` holds ``[b*B, min((b+1)*B, N))``."""
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, num_images))) for s in range(0, num_images, batch_size)]


def existing_images(num_images: int, out_dir: str | os.PathLike) -> list[int]:
    """Indices in ``[0, num_images)`` whose PNG already exists in ``out_dir``."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    return [i for i in range(num_images) if image_path(d, i).is_file()]


def pending_batches(num_images: int, batch_size: int, out_dir: str | os.PathLike) -> list[list[int]]:
    """The fixed batches that still have at least one image missing from ``out_dir`` (for ``--resume``).

    A batch is kept whole (done images are sampled again but not rewritten) because its images' pixels
    may depend, up to rounding, on which images share the batch.
    """
    done = set(existing_images(num_images, out_dir))
    return [b for b in batch_indices(num_images, batch_size) if not all(i in done for i in b)]


def _create_temp(path: Path) -> tuple[int, str]:
    """Create and open a new temp file next to ``path``: ``.<name>.<random>.tmp``, removable by
    :func:`remove_stale_temp_files`.

    It is created the way ``open(path, "w")`` creates a file, with mode ``0o666`` that the kernel reduces by
    the umask (or a default ACL of the folder); ``tempfile.mkstemp`` would give ``0o600``, which the rename
    would then carry to the final file.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temp file next to {path}")  # pragma: no cover


def _publish(tmp: str, path: Path, replace: bool = True) -> None:
    """Move ``tmp`` (a finished temp file next to ``path``) to ``path``.

    ``replace=False`` never replaces an existing ``path`` (FileExistsError): the temp file is hard-linked to the
    new name, which fails if the name exists; where the file system has no hard links, an existence check and
    ``os.replace`` follow instead.
    """
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_png_atomic(image: np.ndarray, path: str | os.PathLike, replace: bool = True) -> None:
    """Write a uint8 HWC/HW image as PNG via a temp file in the same folder and ``os.replace``.

    A crash or Ctrl-C leaves either the old file or the complete new one, never half a PNG. The file gets the
    permissions the umask gives (see :func:`_create_temp`). ``replace=False`` refuses to replace an existing
    file.
    """
    from PIL import Image

    path = Path(path)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr).save(f, format="PNG")
        _publish(tmp, path, replace)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pipeline output in ``[0, 1]`` (NCHW tensor or NHWC array) → NHWC uint8, rounded as diffusers' numpy_to_pil."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def make_grid(images: Sequence[np.ndarray], nrow: int | None = None, padding: int = 2, scale: int = 1):
    """A PIL grid of uint8 HWC images, ``nrow`` per row (default: about square), upscaled by ``scale`` (nearest)."""
    from PIL import Image

    if not len(images):
        raise ValueError("make_grid needs at least one image")
    arrs = [np.asarray(im) if np.asarray(im).ndim == 3 else np.asarray(im)[..., None] for im in images]
    h, w, c = arrs[0].shape
    nrow = nrow or math.ceil(math.sqrt(len(arrs)))
    rows = math.ceil(len(arrs) / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, np.uint8)
    for k, a in enumerate(arrs):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = a
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def sample_batch(pipeline, indices: Sequence[int], seed: int, num_inference_steps: int) -> np.ndarray:
    """Sample the images ``indices`` (one batch) and return them as NHWC uint8."""
    gens = image_generators(seed, indices)
    out = pipeline(batch_size=len(indices), generator=gens, num_inference_steps=num_inference_steps, output_type="np")
    images = out.images if hasattr(out, "images") else out[0]
    return to_uint8(images)


def sample_images(
    pipeline,
    batches: Iterable[Sequence[int]],
    seed: int,
    num_inference_steps: int,
    out_dir: str | os.PathLike | None = None,
    skip_existing: bool = False,
    progress=None,
    replace: bool = True,
) -> dict[int, np.ndarray]:
    """Sample every batch of ``batches`` and return ``{index: uint8 HWC image}``.

    With ``out_dir``, each image is written to ``out_dir/<index:06d>.png`` atomically as soon as its batch is done
    (images that already exist are left untouched when ``skip_existing``; with ``replace=False`` an image file
    that exists when it is written is an error, never replaced). ``progress`` is called with the number of
    images finished after every batch.
    """
    results: dict[int, np.ndarray] = {}
    for batch in batches:
        batch = list(batch)
        images = sample_batch(pipeline, batch, seed, num_inference_steps)
        for i, img in zip(batch, images):
            results[i] = img
            if out_dir is not None:
                p = image_path(out_dir, i)
                if not (skip_existing and p.exists()):
                    write_png_atomic(img, p, replace=replace)
        if progress is not None:
            progress(len(batch))
    return results


def load_png(path: str | os.PathLike) -> np.ndarray:
    """An image file as an HWC uint8 array; a file that cannot be decoded is a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for bad files
        raise ValueError(
            f"{path} cannot be read as an image ({_reason(e)}); delete it, or rerun with --resume to sample it again"
        ) from None
    return arr[..., None] if arr.ndim == 2 else arr


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def image_problem(path: str | os.PathLike) -> str | None:
    """Why the image file at ``path`` cannot be used (it does not decode completely), or None if it can.

    PIL's ``verify`` checks the file's structure and checksums, then a fresh ``load`` decodes every pixel: a
    truncated or corrupt PNG fails one of them.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
    except MemoryError:
        raise
    except Exception as e:
        return _reason(e)
    return None


def damaged_images(num_images: int, out_dir: str | os.PathLike, workers: int | None = None) -> list[tuple[int, str]]:
    """``(index, reason)`` for each existing image in ``[0, num_images)`` of ``out_dir`` that does not decode.

    Decoding runs on a few threads (PIL releases the GIL while it inflates), in index order of the result.
    """
    from concurrent.futures import ThreadPoolExecutor

    indices = existing_images(num_images, out_dir)
    if not indices:
        return []
    workers = workers or min(8, os.cpu_count() or 1, len(indices))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(lambda i: image_problem(image_path(out_dir, i)), indices))
    return [(i, p) for i, p in zip(indices, problems) if p is not None]


def prepare_output_dir(out_dir: str | os.PathLike, num_images: int, overwrite: bool, resume: bool) -> None:
    """Create ``out_dir`` and refuse to clobber existing images unless ``overwrite`` or ``resume``."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--output {str(d)!r} exists and is not a folder")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"--output {str(d)!r} is not writable ({e.strerror or e})") from None
    if not (overwrite or resume):
        clash = existing_images(num_images, d)
        if clash:
            raise FileExistsError(
                f"--output {str(d)!r} already holds {len(clash)} of the images (e.g. {image_path(d, clash[0]).name}); "
                "pass --overwrite to replace them or --resume to finish the missing ones"
            )


_TEMP_RE = re.compile(r"^\..+\.(png|npz)\..*tmp$")


def remove_stale_temp_files(out_dir: str | os.PathLike) -> int:
    """Delete temp files left by a killed run (``.000012.png.<random>.tmp``); returns how many.

    Call only while no process writes to ``out_dir`` (under torchrun: rank 0, before the plan is broadcast).
    """
    d = Path(out_dir)
    n = 0
    for p in d.iterdir() if d.is_dir() else ():
        if _TEMP_RE.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def default_npz_path(out_dir: str | os.PathLike, shape: Sequence[int]) -> Path:
    """``out_dir/samples_<N>x<H>x<W>x<C>.npz``, the name guided-diffusion's sampling scripts use."""
    return Path(out_dir) / f"samples_{'x'.join(str(int(v)) for v in shape)}.npz"


def npz_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of ``arr_0`` when ``path`` is an ``.npz`` laid out as :func:`write_npz` writes it
    (one uncompressed member ``arr_0.npy``), else None. Reads the header only."""
    try:
        with zipfile.ZipFile(path) as zf:
            if zf.namelist() != ["arr_0.npy"]:
                return None
            with zf.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    return None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    return (tuple(shape), dtype) if not fortran else None


def write_npz(
    out_dir: str | os.PathLike, num_images: int, path: str | os.PathLike | None = None, replace: bool = True
) -> Path:
    """Pack ``out_dir/000000.png ...`` into one ``.npz`` holding ``arr_0``: uint8 ``(N, H, W, C)`` in index order.

    This is the layout of guided-diffusion's (ADM) evaluation suite and what ``numpy.load(path)["arr_0"]``
    returns. Images are streamed into the archive one at a time (memory stays one image, not N), into a temp
    file renamed over ``path`` at the end, with the permissions the umask gives. ``path`` defaults to
    :func:`default_npz_path`. ``replace=False`` refuses to replace an existing file (FileExistsError). Returns
    the path.
    """
    first_path = image_path(out_dir, 0)
    if not first_path.is_file():
        raise FileNotFoundError(_missing_message(out_dir, 0))
    first = load_png(first_path)
    shape = (num_images, *first.shape)
    path = Path(path) if path is not None else default_npz_path(out_dir, shape)
    fd, tmp = _create_temp(path)
    os.close(fd)
    try:
        # np.savez layout: an uncompressed zip member "arr_0.npy" in .npy format 1.0 (zip64 for > 4 GB).
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False,
                    "shape": shape,
                }
                np.lib.format.write_array_header_1_0(f, header)
                for i in range(num_images):
                    p = image_path(out_dir, i)
                    if not p.is_file():
                        raise FileNotFoundError(_missing_message(out_dir, i))
                    img = first if i == 0 else load_png(p)
                    if img.shape != first.shape or img.dtype != np.uint8:
                        raise ValueError(
                            f"{p.name} is {img.shape} {img.dtype}, {first_path.name} is {first.shape} uint8: "
                            "--output mixes images of different runs (use an empty folder or --overwrite)"
                        )
                    f.write(np.ascontiguousarray(img).tobytes())
        _publish(tmp, path, replace)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _missing_message(out_dir, index: int) -> str:
    return (
        f"{image_path(out_dir, index)} is missing; when several machines sample, --output must be one "
        "folder they all share (NFS or similar)"
    )


def sample_sharded(
    pipeline,
    batches: Sequence[Sequence[int]],
    seed: int,
    num_inference_steps: int,
    dist,
    out_dir: str | os.PathLike,
    skip_existing: bool = False,
    progress=None,
    replace: bool = True,
) -> int:
    """Sample this rank's round-robin share of ``batches`` into ``out_dir``; returns the images done by all ranks.

    ``dist`` is a :class:`ddpm_fast.distributed.Distributed` (a single-process one works too). Every round each
    rank samples at most one batch and then all ranks exchange a status: a rank that raised stops the job on
    every rank (see :meth:`~ddpm_fast.distributed.Distributed.check`). ``progress`` (rank 0 only, typically)
    gets the number of images all ranks finished in each round; ``replace`` goes to :func:`sample_images`.
    """
    from .distributed import maybe_inject_failure, shard

    mine = shard(list(batches), dist.rank, dist.world_size)
    rounds = math.ceil(len(batches) / dist.world_size)
    total = 0
    for r in range(rounds):
        done = 0
        try:
            if r < len(mine):
                maybe_inject_failure(dist.rank, r)
                sample_images(
                    pipeline,
                    [mine[r]],
                    seed,
                    num_inference_steps,
                    out_dir=out_dir,
                    skip_existing=skip_existing,
                    replace=replace,
                )
                done = len(mine[r])
        except Exception:
            dist.check(False, "sampling")
            raise
        finished = int(dist.check(True, "sampling", done))
        total += finished
        if progress is not None:
            progress(finished)
    return total
