"""Dilated-attention patterns: what a branch is and how it cuts the tokens.

A *pattern* is a list of :class:`Branch`. A branch has a segment size and a dilation, either 1-D over
the token sequence (``segment=w, dilation=r``) or 2-D over an image grid of ``grid=(Hg, Wg)`` tokens in
row-major order (``segment=(wh, ww), dilation=(rh, rw)``). Head ``h`` of a branch keeps, inside every
segment, the positions whose in-segment index is congruent to its offset modulo the dilation:
1-D offset ``h mod r``; 2-D offsets ``((h // rw) mod rh, h mod rw)``. Kept positions of a segment attend
densely among themselves. The last segment along an axis may be partial.

1-D, ``segment=8, dilation=2`` over N = 12 tokens (``a``: kept by heads with offset 0, ``b``: offset 1)::

    token    0 1 2 3 4 5 6 7 | 8 9 10 11
    segment  0 0 0 0 0 0 0 0 | 1 1 1  1      (segment 1 is partial)
    offset   a b a b a b a b | a b a  b      head 0 attends {0,2,4,6} and {8,10}

2-D, ``segment=(4, 4), dilation=(2, 2)`` on a 4x6 grid; head ``h`` has offsets
``((h // 2) % 2, h % 2)`` and keeps the positions marked with its letter (head 0 ``a``, 1 ``b``,
2 ``c``, 3 ``d``; head 4 repeats head 0)::

    a b a b | a b
    c d c d | c d        segment (0,0) is 4x4, segment (0,1) is 4x2 (partial)
    a b a b | a b        head 0: the four a's of the left segment attend each other,
    c d c d | c d        and so do the two a's of the right segment

Several branches, e.g. LongNet's ``[Branch(4, 1), Branch(8, 2)]`` for head 1 over 8 tokens::

    token      0 1 2 3 | 4 5 6 7
    branch 0   x x x x | x x x x      every token, segments of 4
    branch 1     x   x     x   x      offset 1 mod 2, one segment of 8

Token 3 attends {0,1,2,3} in branch 0 and {1,3,5,7} in branch 1; the two results are mixed with
weights softmax(lse_0, lse_1), which is exactly one softmax over both key sets. Token 2 is kept only by
branch 0; a token kept by no branch of its head gets output 0 and lse -inf.

``segment = N`` (or the grid) with ``dilation = 1`` is ordinary dense attention; a 2-D window with
dilation 1 is windowed attention.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional, Sequence, Tuple, Union

import numpy as np

IntOr2 = Union[int, Tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Branch:
    """One branch of a dilated-attention pattern: a segment size and a dilation (1-D ints or 2-D tuples)."""

    segment: IntOr2
    dilation: IntOr2 = 1

    def __post_init__(self):
        seg, dil = self.segment, self.dilation
        seg_2d = isinstance(seg, (tuple, list))
        dil_2d = isinstance(dil, (tuple, list))
        if seg_2d:
            seg = tuple(seg)
            if len(seg) != 2 or not all(_is_int(s) for s in seg):
                raise TypeError(f"Branch segment must be an int or a pair of ints, got {self.segment!r}")
            if not dil_2d:
                if not _is_int(dil):
                    raise TypeError(f"Branch dilation must be an int or a pair of ints, got {self.dilation!r}")
                dil = (int(dil), int(dil))
            dil = tuple(dil)
            if len(dil) != 2 or not all(_is_int(d) for d in dil):
                raise TypeError(f"Branch dilation must be a pair of ints for a 2-D segment, got {self.dilation!r}")
            seg = (int(seg[0]), int(seg[1]))
            dil = (int(dil[0]), int(dil[1]))
            if min(seg) < 1:
                raise ValueError(f"Branch segment must be >= 1 along each axis, got {seg}")
            if min(dil) < 1:
                raise ValueError(f"Branch dilation must be >= 1 along each axis, got {dil}")
            if dil[0] > seg[0] or dil[1] > seg[1]:
                raise ValueError(f"Branch dilation {dil} must not exceed the segment {seg} along any axis")
        else:
            if not _is_int(seg):
                raise TypeError(f"Branch segment must be an int or a pair of ints, got {self.segment!r}")
            if dil_2d or not _is_int(dil):
                raise TypeError(f"Branch dilation must be an int for a 1-D segment, got {self.dilation!r}")
            seg, dil = int(seg), int(dil)
            if seg < 1:
                raise ValueError(f"Branch segment must be >= 1, got {seg}")
            if dil < 1:
                raise ValueError(f"Branch dilation must be >= 1, got {dil}")
            if dil > seg:
                raise ValueError(f"Branch dilation {dil} must not exceed the segment {seg}")
        object.__setattr__(self, "segment", seg)
        object.__setattr__(self, "dilation", dil)

    @property
    def is_2d(self) -> bool:
        return isinstance(self.segment, tuple)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class ResolvedBranch:
    """A branch in kernel terms: everything addressed on a 2-D grid ``(rows, cols)``.

    A 1-D branch over N tokens becomes a branch on the grid ``(1, N)``; a 2-D branch keeps its grid.
    1-D segments are clipped to N; 2-D segments may exceed the grid (one partial segment).
    """

    rows: int
    cols: int
    seg: Tuple[int, int]
    dil: Tuple[int, int]
    is_2d: bool

    @property
    def n_seg(self) -> Tuple[int, int]:
        return (-(-self.rows // self.seg[0]), -(-self.cols // self.seg[1]))

    def kept_extent(self, padded: bool) -> Tuple[int, int]:
        """Largest number of kept key rows / columns in any segment, over all head offsets (``padded``:
        segments cut from a grid padded to whole segments, as SAM's window padding does)."""
        (sh, sw), (dy, dx) = self.seg, self.dil
        if padded:
            return -(-sh // dy), -(-sw // dx)
        return -(-min(sh, self.rows) // dy), -(-min(sw, self.cols) // dx)

    def offsets(self, head: int) -> Tuple[int, int]:
        dy, dx = self.dil
        return ((head // dx) % dy, head % dx)



def check_grid(grid, n_tokens: int) -> Optional[Tuple[int, int]]:
    if grid is None:
        return None
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(_is_int(g) for g in grid):
        raise TypeError(f"grid must be a pair of ints (Hg, Wg), got {grid!r}")
    grid = (int(grid[0]), int(grid[1]))
    if min(grid) < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if grid[0] * grid[1] != n_tokens:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} tokens but q has N={n_tokens} tokens")
    return grid


def check_pattern(pattern, name: str = "pattern") -> Optional[Tuple[Branch, ...]]:
    """Normalise a user pattern (None, a Branch, or a sequence of Branch) to None or a tuple of Branch;
    TypeError / ValueError naming ``name`` otherwise. Grid-dependent checks happen at call time."""
    if pattern is None:
        return None
    if isinstance(pattern, Branch):
        return (pattern,)
    if not isinstance(pattern, Sequence) or isinstance(pattern, (str, bytes)):
        raise TypeError(f"{name} must be None, a sam_fast.Branch or a list of Branch, got {type(pattern).__name__}")
    if len(pattern) == 0:
        raise ValueError(f"{name} must contain at least one Branch, got an empty list")
    for i, b in enumerate(pattern):
        if not isinstance(b, Branch):
            raise TypeError(f"{name}[{i}] must be a sam_fast.Branch, got {type(b).__name__}")
    return tuple(pattern)


def resolve_pattern(pattern, n_tokens: int, grid: Optional[Tuple[int, int]]) -> Tuple[ResolvedBranch, ...]:
    """Validate ``pattern`` (None, a Branch, or a sequence of Branch) for N tokens on ``grid``."""
    if pattern is None:
        if grid is not None:
            return (ResolvedBranch(grid[0], grid[1], grid, (1, 1), True),)
        return (ResolvedBranch(1, n_tokens, (1, n_tokens), (1, 1), False),)
    pattern = check_pattern(pattern)
    out = []
    for i, b in enumerate(pattern):
        if b.is_2d:
            if grid is None:
                raise ValueError(f"pattern[{i}] is a 2-D branch {b} but no grid=(Hg, Wg) was given")
            if b.dilation[0] > grid[0] or b.dilation[1] > grid[1]:
                raise ValueError(f"pattern[{i}] has dilation {b.dilation}, larger than the {grid[0]}x{grid[1]} grid: "
                                 "every head would keep at most one row or column of it; use a dilation "
                                 "within the grid")
            # Not clipped to the grid: with pad_kv a segment larger than the grid is completed with
            # virtual keys, as segment_anything pads an 8x8 grid to one 14x14 window.
            out.append(ResolvedBranch(grid[0], grid[1], b.segment, b.dilation, True))
        else:
            if b.dilation > n_tokens:  # the segment is clipped to N; its work would grow with the dilation
                raise ValueError(f"pattern[{i}] has dilation {b.dilation}, larger than the N={n_tokens} tokens: every "
                                 "head would keep at most one token; use a dilation of at most N")
            out.append(ResolvedBranch(1, n_tokens, (1, min(b.segment, n_tokens)), (1, b.dilation), False))
    return tuple(out)


def pattern_from_lists(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> list:
    """LongNet-style ``(segment_lengths, dilation_rates)`` -> list of 1-D :class:`Branch`."""
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(segment_lengths)} and {len(dilation_rates)}"
        )
    out = []
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        try:
            w, r = operator.index(w), operator.index(r)
        except TypeError:
            raise TypeError(f"segment_lengths[{i}] and dilation_rates[{i}] must be integers, "
                            f"got {w!r} and {r!r}") from None
        out.append(Branch(w, r))
    return out


def parse_pattern(text: str, name: str = "--pattern") -> list:
    """A pattern from text (the command line's form): branches separated by commas, each
    ``SEGMENT[:DILATION]`` where a 2-D size is ``HxW`` and a 1-D one an int, e.g. ``"64x64:2x2"``,
    ``"14x14,64x64:2x2"``, ``"256:2"``. ``ValueError`` naming ``name`` for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name} must be branches like '64x64:2x2' or '14x14,64x64:2x2', got {text!r}")

    def size(part: str):
        dims = part.strip().lower().split("x")
        # ASCII digits only: str.isdigit() also passes '²' and other digits int() refuses
        if len(dims) not in (1, 2) or not all(d.strip().isascii() and d.strip().isdigit() for d in dims):
            raise ValueError(f"{name}: {part.strip()!r} is not a size (an int, or HxW)")
        vals = tuple(int(d) for d in dims)
        return vals[0] if len(vals) == 1 else vals

    out = []
    for item in text.split(","):
        seg, _, dil = item.partition(":")
        segment = size(seg)
        dilation = size(dil) if dil.strip() else (1 if isinstance(segment, int) else (1, 1))
        try:
            out.append(Branch(segment, dilation))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: {item.strip()!r}: {exc}") from None
    return out


def check_pattern_covers(pattern, grid, heads: int, name: str = "pattern") -> None:
    """``ValueError`` naming ``name`` unless the pattern tiles the ``grid``: every token must be kept by at
    least one branch in at least one of the ``heads`` heads. (A head attends only the tokens at its offset,
    as in LongNet, and other heads cover the rest; a token no head keeps gets a zero attention output in
    every head, which no training can repair.) Also the grid-dependent checks of the pattern itself."""
    try:
        branches = resolve_pattern(check_pattern(pattern, name), grid[0] * grid[1], grid)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    rows, cols = np.arange(grid[0])[:, None], np.arange(grid[1])[None, :]
    flat = rows * grid[1] + cols
    covered = np.zeros(grid, dtype=bool)
    for h in range(heads):
        for br in branches:
            oy, ox = br.offsets(h)
            (sh, sw), (dy, dx) = br.seg, br.dil
            if br.is_2d:
                covered |= ((rows % sh) % dy == oy) & ((cols % sw) % dx == ox)
            else:
                covered |= (flat % sw) % dx == ox
    if not covered.all():
        r, c = map(int, np.argwhere(~covered)[0])
        raise ValueError(f"{name} does not tile the {grid[0]}x{grid[1]} token grid with {heads} heads: "
                         f"{int((~covered).sum())} tokens (e.g. row {r}, column {c}) are kept by no head in any "
                         "branch, so their attention output would be 0; head h keeps offset ((h // dx) % dy, h % dx) "
                         "of a 2-D dilation (dy, dx), so dy * dx must not exceed the heads, or add a branch with "
                         "dilation 1")
