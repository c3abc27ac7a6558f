"""Image files in, SAM's input tensors out.

:func:`read_rgb` reads one file as HxWx3 uint8 RGB; :func:`list_images` finds the JPEG / PNG files of a
folder (recursively) or checks a list of paths; :func:`resize_pad` and :func:`normalize` split
segment_anything's preprocessing (``ResizeLongestSide`` to the encoder's input size, normalisation by the
pixel mean / std, zero padding to a square) into a uint8 half that can be stored and a float half run per
batch on the device: ``normalize(resize_pad(image))`` is ``Sam.preprocess`` of the resized image.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def read_rgb(source, name: Optional[str] = None) -> np.ndarray:
    """An image file (a path, or the file's bytes) as HxWx3 uint8 RGB; 16-bit images are scaled to 8 bits, not
    clipped at 255. ``name`` (default: the path) is what an error calls the file: file bytes have no name."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
        name = name or "the file's bytes"
    label = name or os.fspath(source)
    try:
        return _decode(Image.open(source))
    except UnidentifiedImageError:
        raise ValueError(f"{label} is not an image file Pillow can read") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # a truncated or corrupt file: say which
        raise ValueError(f"{label}: cannot decode it ({type(exc).__name__}: {exc})") from None


def _decode(opened) -> np.ndarray:
    with opened as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
            rgb = np.repeat(np.round(a / top * 255.0).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
        else:
            arr = np.asarray(im)
            if arr.dtype == np.uint16:  # 16-bit RGB(A) loaded by a newer Pillow
                arr = np.round(arr[..., :3] / 65535.0 * 255.0).astype(np.uint8)
                rgb = arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
            else:
                rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb)


def list_images(source, name: str = "images") -> List[str]:
    """The image files of ``source``: a folder (searched recursively for .jpg / .jpeg / .png, any case,
    sorted by path) or a sequence of file paths (kept in order). ``ValueError`` naming ``name`` when there
    is nothing to read; ``FileNotFoundError`` for a path that does not exist."""
    if isinstance(source, (str, os.PathLike)):
        root = os.fspath(source)
        if not os.path.exists(root):
            raise FileNotFoundError(f"{name}: {root} does not exist")
        if os.path.isfile(root):
            return [root]
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, f) for f in filenames
                         if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not found:
            raise ValueError(f"{name}: {root} holds no JPEG or PNG images (searched recursively for "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
        return sorted(found)
    if not isinstance(source, Sequence) or isinstance(source, (bytes, str)):
        raise TypeError(f"{name} must be a folder or a list of image paths, got {type(source).__name__}")
    paths = []
    for i, p in enumerate(source):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"{name}[{i}] must be a path, got {type(p).__name__}")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{name}[{i}]: {os.fspath(p)} is not a file")
        paths.append(os.fspath(p))
    if not paths:
        raise ValueError(f"{name} is empty: give a folder of JPEG / PNG images or a list of paths")
    return paths


def sample_photo(name: str) -> np.ndarray:
    """scikit-image's bundled sample photo ``name`` (e.g. ``"astronaut"``, ``"camera"``) as HxWx3 uint8 RGB: a grey
    one as three equal channels, an alpha channel dropped. Real photographs without a download, for examples,
    checks and tests."""
    import skimage.data as data

    a = np.asarray(getattr(data, name)())
    if a.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is not an 8-bit image ({a.dtype})")
    a = np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a[..., :3]
    return np.ascontiguousarray(a)


def resize_pad(image: np.ndarray, img_size: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """``image`` (HxWx3 uint8) resized as segment_anything's ``ResizeLongestSide(img_size)`` does and
    zero-padded at the bottom / right: ((3, img_size, img_size) uint8, (h, w) of the resized image)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an HxWx3 uint8 array, got {getattr(image, 'dtype', type(image).__name__)} "
                         f"of shape {getattr(image, 'shape', None)}")
    resized = ResizeLongestSide(img_size).apply_image(image)
    h, w = resized.shape[:2]
    out = np.zeros((3, img_size, img_size), dtype=np.uint8)
    out[:, :h, :w] = resized.transpose(2, 0, 1)
    return out, (h, w)


def normalize(images: torch.Tensor, input_hw: torch.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> torch.Tensor:
    """(B, 3, S, S) uint8 from :func:`resize_pad` and their (B, 2) resized sizes -> the float encoder input:
    ``(x - mean) / std`` inside each image, 0 in its padding (exactly ``Sam.preprocess``)."""
    dev = images.device
    x = images.float()
    x = (x - torch.tensor(mean, device=dev)[:, None, None]) / torch.tensor(std, device=dev)[:, None, None]
    S = images.shape[-1]
    ar = torch.arange(S, device=dev)
    hw = input_hw.to(dev)
    inside = (ar[None, :, None] < hw[:, 0, None, None]) & (ar[None, None, :] < hw[:, 1, None, None])
    return x * inside[:, None].to(x.dtype)
