"""Flash dilated attention with SAM's decomposed relative-position bias (Triton).

One kernel family for every pattern of docs/maintainers/design.md ("Dilated flash attention") (see
:mod:`sam_fast.pattern`): dense attention, SAM's windows, dilated 1-D / 2-D branches and multi-branch mixes, forward and
backward, with online softmax (no N x N matrix in memory), no gather/scatter or padding copies and no
atomics. SAM-Lightening's dilated attention is what this serves; the rel-pos bias is segment_anything's
``add_decomposed_rel_pos`` with absolute grid coordinates.

How a launch is organised:

* Every branch lives on a 2-D addressing grid ``(rows, cols)`` (a 1-D branch over N tokens is the
  grid ``(1, N)``). Branches are planned into *groups* (:func:`plan_groups`); a group is one launch.
* A group's *base segment* is its smallest segment and its *step* the lcm of its dilations. Query
  tiles are *class tiles*: the positions of one base segment with one residue modulo the step. Such a
  tile lies inside one segment of every branch of the group and, for each head, is either kept
  entirely by a branch or not at all; so a program runs every branch that keeps its tile through
  **one** online softmax, which is exactly the lse-weighted merge of the branches, and writes out and
  lse once. Tiles no branch keeps write out 0 and lse -inf. Nested patterns (any single branch,
  LongNet's powers of two) are one group; others become several launches, each starting its online
  softmax from the (out, lse) the previous one left (ACCUMULATE): exact, deterministic, no atomics.
* Backward: the merged attention is a softmax over the union of the branches' key sets normalised by
  the combined lse, so each branch's gradient is the flash backward with that lse and
  ``delta = rowsum(dO * O) - dlse``; the gradient through the branch weights needs no extra term.
  dQ programs own class tiles (like the forward), dK/dV programs own key blocks of class tiles; each
  loops over the branches that keep its tile.
* Keys are visited in 2-D blocks of ``BKY x BKX`` kept positions so that the rel-pos bias of a block is
  ``RH[i, ky] + RW[i, kx]``: column slices of two small per-query tables (one pair per branch, side by
  side) instead of a gather per score. The tables are made by :func:`relpos_tables` with tensor-core
  einsums (segment_anything computes the same ``rel_h``/``rel_w``). A 1-D branch over a 2-D grid has no
  such decomposition (its segments wrap around grid rows): its bias is one per-query table over the
  kept keys (:func:`relpos_table_1d`, memory B * H * N * kept, like a bias mask), read per key block
  (REL_ROWS off). A pattern mixing 1-D and 2-D branches runs each kind in its own launch group.

Tensor contract (the launchers check nothing a caller could get wrong; sam_fast.ops validates):

* ``q, k, v``: (B, N, H, D), last dim contiguous, other strides free, fp16/bf16/fp32, D <= 128.
  D is padded to a power of two inside the kernel by masked loads, never by copies; a D that is not
  a power of two runs as two power-of-two column slices when that pads less
  (:func:`head_dim_split`: ViT-H's 80 runs as 64 + 16, not 128).
* ``pad_k, pad_v`` (H, D), single 2-D branch only: partial segments are completed to full size with
  virtual keys carrying these vectors (segment_anything pads windows with zero tokens whose k and v
  are the qkv bias). Their gradients are reduced through a compact scratch, no atomics.
* Outputs: ``out`` (B, N, H, D) in the input dtype, ``lse`` (B, H, N) fp32 natural log.

Softmax runs in base 2 (``exp2``) with ``log2(e)`` folded into the scale and bias.


The package, one file per reader:

* ``forward.py``, ``backward.py``, ``common.py`` - the Triton kernels and their shared ``@triton.jit`` helpers
  (kernel authors);
* ``plan.py`` - branch geometry, the flat geometry list, launch groups; ``relpos.py`` - the rel-pos tables
  (the op layer, :mod:`sam_fast.ops.dilated_attention`);
* ``tuning.py`` - launch configuration, the head-dim split, the tuned table (tools/tune_dilated_attention.py);
* ``launch.py`` - :func:`dilated_attention_fwd` / :func:`dilated_attention_bwd`.
"""

from .backward import _dilated_attention_bwd_dkdv_kernel, _dilated_attention_bwd_dq_kernel
from .forward import _dilated_attention_fwd_kernel
from .launch import LOG2E, dilated_attention_bwd, dilated_attention_fwd
from .plan import (
                   MAX_GROUP_BRANCHES,
                   MAX_HEAD_DIM,
                   MAX_REL_WIDTH,
                   MIN_FUSED_TILE,
                   Geometry,
                   Group,
                   decode_pattern,
                   encode_pattern,
                   plan_groups,
)
from .relpos import relpos_backward, relpos_backward_1d, relpos_table_1d, relpos_tables
from .tuning import TUNABLE, forced_config, head_dim_split, padded_head_dim, tune_key, tuned_choice, tuned_table

__all__ = ["LOG2E", "MAX_GROUP_BRANCHES", "MAX_HEAD_DIM", "MAX_REL_WIDTH", "MIN_FUSED_TILE", "TUNABLE", "Geometry",
           "Group", "decode_pattern", "dilated_attention_bwd", "dilated_attention_fwd", "encode_pattern",
           "forced_config", "head_dim_split", "padded_head_dim", "plan_groups", "relpos_backward",
           "relpos_backward_1d", "relpos_table_1d", "relpos_tables", "tune_key", "tuned_choice", "tuned_table",
           "_dilated_attention_fwd_kernel", "_dilated_attention_bwd_dkdv_kernel", "_dilated_attention_bwd_dq_kernel"]
