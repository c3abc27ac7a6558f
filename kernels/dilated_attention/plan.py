"""How a pattern becomes launches (for the op layer): branch geometries on their addressing grids, the flat
geometry list the custom ops carry, and the grouping of branches into launches."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

MAX_HEAD_DIM = 128
MAX_REL_WIDTH = 128  # kept segment width up to which the rel-pos path keeps one key block per row
MAX_GROUP_BRANCHES = 4  # branches one launch runs (the kernels take 4 branch geometries)
# Fusing branches shrinks query tiles to (base segment / lcm of dilations) positions; fuse only while a
# tile keeps at least min(MIN_FUSED_TILE, each branch's own tile) queries, so no program runs mostly
# empty rows (LongNet's {(1024,1),(2048,2),(4096,4)} keeps 256 per tile and fuses).
MIN_FUSED_TILE = 64


class Geometry(tuple):
    """(rows, cols, seg_h, seg_w, dil_h, dil_w) of one branch on its addressing grid."""

    __slots__ = ()

    def __new__(cls, rows, cols, seg_h, seg_w, dil_h, dil_w):
        return super().__new__(cls, (int(rows), int(cols), int(seg_h), int(seg_w), int(dil_h), int(dil_w)))

    rows = property(lambda s: s[0])
    cols = property(lambda s: s[1])
    seg = property(lambda s: (s[2], s[3]))
    dil = property(lambda s: (s[4], s[5]))

    @property
    def n_seg(self):
        return (-(-self.rows // self[2]), -(-self.cols // self[3]))

    def kept_extent(self, padded: bool):
        """Largest number of kept key rows / columns in any segment (over all head offsets)."""
        sh, sw = self.seg
        dy, dx = self.dil
        if padded:
            return -(-sh // dy), -(-sw // dx)
        return -(-min(sh, self.rows) // dy), -(-min(sw, self.cols) // dx)

    def padded_grid(self):
        nsy, nsx = self.n_seg
        return nsy * self[2], nsx * self[3]


def encode_pattern(rows: int, cols: int, branches) -> list:
    """Flat int list (the custom ops' ``geometry``): the token grid ``[rows, cols]`` (``[1, N]`` without
    one), then ``[b_rows, b_cols, seg_h, seg_w, dil_h, dil_w]`` per branch, each branch on its own
    addressing grid: a 2-D branch on the token grid, a 1-D branch on ``(1, N)``."""
    out = [int(rows), int(cols)]
    for branch in branches:
        if len(branch) != 6:
            raise ValueError(f"each branch must be (rows, cols, seg_h, seg_w, dil_h, dil_w), got {tuple(branch)}")
        out += [int(x) for x in branch]
    return out


def decode_pattern(geometry) -> Tuple[Tuple[int, int], Tuple[Geometry, ...]]:
    """(token grid, branch geometries) of an :func:`encode_pattern` list."""
    geometry = [int(x) for x in geometry]
    rest = geometry[2:]
    if len(geometry) < 8 or len(rest) % 6:
        raise ValueError(f"geometry must be [rows, cols] + 6 ints per branch, got {geometry}")
    rows, cols = geometry[0], geometry[1]
    branches = tuple(Geometry(*rest[i:i + 6]) for i in range(0, len(rest), 6))
    for b in branches:
        if b.rows * b.cols != rows * cols:
            raise ValueError(f"branch grid {b.rows}x{b.cols} does not hold the {rows}x{cols} tokens: {geometry}")
    return (rows, cols), branches


class Group:
    """Branches one launch runs: tiles are the classes (residues modulo ``step`` = lcm of the dilations)
    of the base segment (the smallest segment), and each tile lies inside one segment of every branch."""

    def __init__(self, branches: Sequence[Geometry]):
        self.branches = tuple(branches)
        g = self.branches[0]
        self.rows, self.cols = g.rows, g.cols
        self.base = (min(b[2] for b in branches), min(b[3] for b in branches))
        self.step = (math.lcm(*(b[4] for b in branches)), math.lcm(*(b[5] for b in branches)))

    @property
    def n_seg(self):
        return (-(-self.rows // self.base[0]), -(-self.cols // self.base[1]))

    def n_class_tiles(self):
        nsy, nsx = self.n_seg
        return nsy * nsx * self.step[0] * self.step[1]

    def class_extent(self, padded: bool):
        """Largest class lattice (rows, cols) of a base segment; ``padded`` counts SAM's virtual keys."""
        sh, sw = self.base if padded else (min(self.base[0], self.rows), min(self.base[1], self.cols))
        return -(-sh // self.step[0]), -(-sw // self.step[1])

    def kept_extent(self, padded: bool):
        ext = [b.kept_extent(padded) for b in self.branches]
        return max(e[0] for e in ext), max(e[1] for e in ext)


def _fits_group(branches: Sequence[Geometry], min_tile: int) -> bool:
    """Whether one launch can run these branches: same addressing grid, every segment a multiple of the
    smallest (or covering the whole axis), nested dilations (their lcm is the largest, so no class tile
    is wasted on residues no branch keeps), a base segment at least one step long, and tiles no smaller
    than ``min(min_tile, smallest per-branch tile)``."""
    if len(branches) > MAX_GROUP_BRANCHES:
        return False
    rows, cols = branches[0].rows, branches[0].cols
    if any((b.rows, b.cols) != (rows, cols) for b in branches):
        return False
    for axis, extent in ((0, rows), (1, cols)):
        segs = [b[2 + axis] for b in branches]
        dils = [b[4 + axis] for b in branches]
        base = min(segs)
        if any(s % base and s < extent for s in segs):
            return False
        if math.lcm(*dils) != max(dils) or max(dils) > min(base, extent):
            return False
    fused = Group(branches).class_extent(False)
    own = min(b.kept_extent(False)[0] * b.kept_extent(False)[1] for b in branches)
    return fused[0] * fused[1] >= min(min_tile, own)


def plan_groups(branches: Sequence[Geometry], min_tile: Optional[int] = None) -> Tuple[Group, ...]:
    """Split a pattern into launch groups, in order: greedily extend a group while it still fits.
    A pattern whose branches nest (LongNet's powers of two, any single branch) is one group."""
    min_tile = MIN_FUSED_TILE if min_tile is None else min_tile
    groups, current = [], []
    for b in branches:
        if current and _fits_group(current + [b], min_tile):
            current.append(b)
            continue
        if current:
            groups.append(Group(current))
        current = [b]
    groups.append(Group(current))
    return tuple(groups)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()
