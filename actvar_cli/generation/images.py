"""Image files: one PNG per sample, a grid, and the ADM evaluator's ``samples.npz``."""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from ..files import atomic_path, atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def png_name(index: int, class_id: int) -> str:
    """Files sort in generation order; the class is visible in the name."""
    return f"{index:06d}_class{class_id:04d}.png"


def save_png(path: str | os.PathLike, hwc: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_png(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}", "delete it and run again to regenerate it") from e


def grid(images_NHWC: np.ndarray, nrow: int = 8, pad: int = 2) -> np.ndarray:
    n, h, w, c = images_NHWC.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images_NHWC):
        r, q = divmod(i, ncol)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return out


def labelled_grid(rows: list[np.ndarray], row_names: list[str], col_names: list[str], scale: int = 3) -> np.ndarray:
    """Rows of images (each N x H x W x 3) side by side, enlarged ``scale`` times, with a name
    before each row and above each column."""

    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    left, top, pad = 8 + 7 * max(len(n) for n in row_names), 16, 2
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + ncol * (w + pad), top + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(col_names[:ncol]):
        draw.text((left + j * (w + pad) + 2, 2), name[: max(1, w // 6)], fill="black")
    for i, (row, name) in enumerate(zip(rows, row_names)):
        y = top + i * (h + pad)
        draw.text((4, y + h // 2 - 5), name, fill="black")
        for j, img in enumerate(row):
            tile = Image.fromarray(img).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + j * (w + pad), y))
    return np.asarray(canvas)


def write_npz(
    path: str | os.PathLike, images: Iterable[np.ndarray], count: int, shape_hwc: tuple[int, int, int]
) -> None:
    """Stream uint8 NHWC images into ``arr_0`` of an .npz without holding them all in memory."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (count, *shape_hwc)}
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                written = 0
                for img in images:
                    if img.shape != shape_hwc or img.dtype != np.uint8:
                        raise DataError(f"image {written} has shape {img.shape}, expected {shape_hwc} uint8")
                    f.write(np.ascontiguousarray(img).tobytes())
                    written += 1
                if written != count:
                    raise DataError(f"wrote {written} images into the npz, expected {count}")


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    """``arr_0`` of an ADM-style batch (uint8 N x H x W x 3), memory-mapped when stored uncompressed.

    The array header is read and checked against the size the archive gives the member before
    anything is allocated: a header that claims 10^12 images is refused, not believed."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("arr_0.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f, max_header_size=1 << 16)
                header_len = f.tell()
    except KeyError:
        raise DataError(f"{path} has no arr_0 array", "give an ADM reference batch or a samples.npz") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path} is not a readable .npz file") from e
    if dtype != np.uint8:
        raise DataError(f"{path}: arr_0 holds {dtype} values, not uint8 images", "give uint8 images (0..255)")
    if len(shape) != 4 or shape[-1] != 3 or fortran:
        raise DataError(f"{path}: arr_0 has shape {shape}, expected N x H x W x 3")
    if math.prod(shape) != info.file_size - header_len:
        raise DataError(f"{path}: arr_0's header claims {shape}, which its {info.file_size} bytes do not hold")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["arr_0"])
    with open(path, "rb") as fh:  # the member's data follows its local header (30 bytes, name, extra)
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)


MAX_IMAGE_SIDE = 4096


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header alone; huge or unreadable files are refused."""
    try:
        with Image.open(path) as im:
            size = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}", "remove it or give another reference") from e
    if max(size) > MAX_IMAGE_SIDE:
        raise DataError(
            f"{path} is {size[0]}x{size[1]} pixels", f"reference images are at most {MAX_IMAGE_SIDE} a side"
        )
    return size
