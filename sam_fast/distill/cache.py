"""The teacher runs once per image: its outputs are cached on disk and memory-mapped during training.

A cache is a folder ``<out_dir>/teacher_cache/<key>/`` holding, for the N readable images:

* ``images.npy``: (N, 3, S, S) uint8, each image resized and zero-padded as SAM does
  (:func:`sam_fast.images.resize_pad`); ``input_hw.npy`` (N, 2) the resized sizes;
* ``embedding.npy``: (N, C, h, w) the teacher's image embeddings;
* ``block_<i>.npy``: (N, h, w, D) the output of teacher block ``i``, for the blocks DLD distills;
* ``meta.json``: the source files, the images skipped as unreadable (with why), shapes, dtype; written
  last, so a folder without it is an interrupted build and is rebuilt.

``key`` hashes everything the contents depend on: the teacher encoder's parameters and buffers (names,
shapes, dtypes, bytes), the pixel mean / std, the image files (path, size, modification time), the input
size, the cached blocks and the dtype. A changed teacher or image set gives a new key, and caches under
other keys are removed when a new one is built, so a run never reads stale features. Features are stored
as float16 (``cache_dtype="float32"`` doubles the size; a value beyond float16's range is an error that
says so). Size per image: ``2 * (C*h*w + len(blocks)*h*w*D)`` bytes, plus ``3*S*S`` for the image -
for ViT-B with all 12 blocks about 77 MB, so cache a subset of blocks for large image sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..images import normalize, read_rgb, resize_pad

FORMAT = 2  # 2: arrays keep a row per source file, meta's "count" says how many are filled
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}


def module_digest(module: nn.Module) -> str:
    """sha256 over a module's state_dict: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _files_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class BlockOutputs:
    """Context manager recording the outputs of ``encoder.blocks[i]`` for ``i`` in ``indices`` (forward
    hooks on the modules that sit in ``encoder.blocks`` when entered, so swapped blocks are seen)."""

    def __init__(self, encoder: nn.Module, indices: Sequence[int]):
        self.encoder, self.indices = encoder, tuple(indices)
        self.outputs: Dict[int, torch.Tensor] = {}
        self._hooks = []

    def __enter__(self):
        for i in self.indices:
            def hook(module, args, output, i=i):
                self.outputs[i] = output
            self._hooks.append(self.encoder.blocks[i].register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []


class TeacherCache:
    """A built cache, memory-mapped (read with :meth:`batch`). Build or reuse one with :func:`teacher_cache`."""

    def __init__(self, folder: str):
        self.folder = folder
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        self.key = os.path.basename(folder)
        self.files: List[str] = self.meta["files"]
        self.skipped: Dict[str, str] = self.meta["skipped"]
        self.blocks: Tuple[int, ...] = tuple(self.meta["blocks"])
        count = int(self.meta["count"])  # the arrays have a row per source file; the first `count` are filled

        def rows(name):
            return np.load(os.path.join(folder, name), mmap_mode="r")[:count]

        self.images = rows("images.npy")
        self.input_hw = np.load(os.path.join(folder, "input_hw.npy"))
        self.embedding = rows("embedding.npy")
        self.block_outputs = {i: rows(f"block_{i}.npy") for i in self.blocks}

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: Sequence[int], device, mean, std) -> Dict[str, object]:
        """Images ``indices`` as the encoder's float input and the teacher's float32 targets on ``device``."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx)  # memmaps read fastest in file order
        inverse = np.argsort(order)

        def take(arr):
            return torch.from_numpy(np.ascontiguousarray(arr[idx[order]][inverse])).to(device)

        hw = torch.from_numpy(self.input_hw[idx]).to(device)
        return {"image": normalize(take(self.images), hw, mean, std), "input_hw": hw,
                "embedding": take(self.embedding).float(),
                "blocks": {i: take(a).float() for i, a in self.block_outputs.items()}}


def cache_key(teacher_encoder: nn.Module, files: Sequence[str], img_size: int, blocks: Sequence[int], mean, std,
              cache_dtype: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "img_size": img_size, "blocks": list(blocks), "mean": list(mean),
                         "std": list(std), "dtype": cache_dtype}).encode())
    h.update(module_digest(teacher_encoder).encode())
    h.update(_files_digest(files).encode())
    return h.hexdigest()[:24]


def _check_space(folder: str, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ValueError(f"out_dir: the teacher cache needs {need / 2**30:.1f} GiB but {folder} has "
                         f"{free / 2**30:.1f} GiB free; cache fewer blocks (cache_blocks) or use another out_dir")


@torch.no_grad()
def teacher_cache(teacher: nn.Module, files: Sequence[str], out_dir: str, blocks: Sequence[int], *, mean, std,
                  device, batch_size: int = 8, cache_dtype: str = "float16", progress: bool = True,
                  rank: int = 0, barrier=None, key: Optional[str] = None) -> TeacherCache:
    """Build (or reuse) the cache of ``teacher``'s embedding and block outputs over ``files``.

    ``teacher`` is a ``Sam`` or a bare ``ImageEncoderViT``; only its image encoder runs, in eval mode,
    ``batch_size`` images at a time. Unreadable files are skipped with one warning listing them; a
    ``ValueError`` naming ``images`` if none is readable. With several processes only ``rank`` 0 builds;
    ``barrier()`` (e.g. ``torch.distributed.barrier``) makes the others wait for it. ``key``: :func:`cache_key` of
    these arguments when the caller has it already (it hashes the teacher's weights)."""
    enc = getattr(teacher, "image_encoder", teacher)
    img_size = int(enc.img_size)
    blocks = tuple(sorted(set(int(i) for i in blocks)))
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {tuple(CACHE_DTYPES)}, got {cache_dtype!r}")
    root = os.path.join(out_dir, "teacher_cache")
    key = key or cache_key(enc, files, img_size, blocks, mean, std, cache_dtype)
    folder = os.path.join(root, key)
    if rank == 0 and not os.path.isfile(os.path.join(folder, "meta.json")):
        os.makedirs(root, exist_ok=True)
        for old in os.listdir(root):  # stale: another teacher, image set or block choice
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        _build(enc, files, folder, blocks, mean, std, device, batch_size, cache_dtype, progress)
    if barrier is not None:
        barrier()
    cache = TeacherCache(folder)
    if cache.skipped and rank == 0:
        listed = ", ".join(f"{p} ({why})" for p, why in list(cache.skipped.items())[:5])
        more = f" and {len(cache.skipped) - 5} more" if len(cache.skipped) > 5 else ""
        warnings.warn(f"images: skipped {len(cache.skipped)} unreadable file(s): {listed}{more}", stacklevel=3)
    return cache


def _readable(files: Sequence[str], img_size: int, skipped: Dict[str, str]):
    """(path, uint8 (3, S, S), (h, w)) for every file that decodes; the others go into ``skipped``."""
    for path in files:
        try:
            arr, hw = resize_pad(read_rgb(path), img_size)
        except Exception as exc:  # a broken file is skipped and reported, never a crash
            skipped[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
            continue
        yield path, arr, hw


def _build(enc, files, folder, blocks, mean, std, device, batch_size, cache_dtype, progress) -> None:
    from tqdm import tqdm

    skipped: Dict[str, str] = {}
    tmp = folder + ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    img_size = int(enc.img_size)
    was_training = enc.training
    enc.eval()
    np_dtype = CACHE_DTYPES[cache_dtype]
    limit = float(np.finfo(np_dtype).max)
    arrays: Dict[str, np.memmap] = {}
    n = len(files)  # rows for every file; those of unreadable files stay unused (meta "count" says how many)
    kept: List[str] = []
    input_hw = np.zeros((n, 2), dtype=np.int64)
    images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+", dtype=np.uint8,
                                       shape=(n, 3, img_size, img_size))
    try:
        bar = tqdm(total=n, desc="teacher cache", unit="image", disable=not progress)
        pending: List[Tuple[str, np.ndarray, Tuple[int, int]]] = []

        def flush():
            start = len(kept)
            x = torch.from_numpy(np.stack([a for _, a, _ in pending])).to(device)
            hw = torch.tensor([h for _, _, h in pending], device=device)
            with BlockOutputs(enc, blocks) as rec:
                emb = enc(normalize(x, hw, mean, std).to(next(enc.parameters()).dtype))
            outs = {"embedding": emb, **{f"block_{i}": rec.outputs[i] for i in blocks}}
            for name, t in outs.items():
                t = t.float().cpu().numpy()
                if not np.isfinite(t).all() or np.abs(t).max() > limit:
                    raise ValueError(f"cache_dtype={cache_dtype!r}: the teacher's {name.replace('_', ' ')} has "
                                     f"values beyond its range (max |x| = {np.abs(t).max():.3g}); use "
                                     "cache_dtype='float32'")
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(os.path.join(tmp, f"{name}.npy"), mode="w+",
                                                             dtype=np_dtype, shape=(n, *t.shape[1:]))
                    if name == "embedding":
                        item = np.dtype(np_dtype).itemsize
                        per_image = sum(int(np.prod(o.shape[1:])) for o in outs.values()) * item
                        _check_space(tmp, n * per_image)
                arrays[name][start:start + len(t)] = t
            for j, (path, arr, hw_j) in enumerate(pending):
                images[start + j] = arr
                input_hw[start + j] = hw_j
                kept.append(path)
            bar.update(len(pending))
            pending.clear()

        for item in _readable(files, img_size, skipped):
            pending.append(item)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        bar.close()
        if not kept:
            path, why = next(iter(skipped.items()))
            raise ValueError(f"images: none of the {len(files)} file(s) could be read as an image (e.g. {path}: "
                             f"{why})")
        for a in (images, *arrays.values()):
            a.flush()
        arrays.clear()
        images = None  # the memmaps are closed before the files are renamed
        np.save(os.path.join(tmp, "input_hw.npy"), input_hw[:len(kept)])
        meta = {"format": FORMAT, "files": kept, "count": len(kept), "skipped": skipped, "blocks": list(blocks),
                "img_size": img_size, "dtype": cache_dtype}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        enc.train(was_training)
