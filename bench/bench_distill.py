"""Benchmark: one distillation training step of a dilated student, by attention implementation.

The step is :func:`sam_fast.distill.distill`'s own (DLD: every block's output and the embedding against
the teacher's, weighted by the schedule; backward; AdamW), on a student whose global blocks run dilated
attention with the teacher's weights. The teacher's outputs are computed once beforehand, as the teacher
cache does. Only the dilated blocks' attention differs between backends (same weights, same batch, one run):

* ``sam_fast(triton)`` - sam_fast's fused dilated attention kernels, forward and backward
  (``sam_fast(cpu)``: its CPU backend, on a CPU);
* ``gather_sdpa_scatter`` (the baseline) - the torchscale / dilated-attention-pytorch method: gather each
  head group's kept tokens, ``scaled_dot_product_attention`` with SAM's decomposed rel-pos bias as
  ``attn_mask`` (the bias depends on q, so it carries a gradient), scatter back;
* ``flex_attention(mask_mod+score_mod)`` (GPU) - FlexAttention on the original layout, the dilation as a
  ``mask_mod`` and the rel-pos bias as a ``score_mod`` reading q's projections onto the rel-pos tables
  (block mask built once, outside the timing; compiled).

Rows: median step time, images/s (``value``), peak memory (CUDA), and ``max_err`` - the backend's first
step loss against sam_fast's (the peers compute the same function; a large error means a peer is wrong).

GPU case: ViT-B geometry (random weights: no checkpoint can be downloaded), 1024^2 input, batch 8 (2 with
--quick), bf16 autocast, the global blocks 2, 5, 8, 11 with the 2-D pattern segment (64, 64), dilation
(2, 2). CPU case: a tiny encoder (16 x 16 tokens, 2 heads), segment (16, 16), dilation (2, 1), fp32,
batch 2.

    python bench/bench_distill.py [--out bench/results] [--quick | --targets]
"""

from __future__ import annotations

import copy
import sys

from sam_fast.kernels._interpreter import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before triton decorates sam_fast's kernels

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sam_fast.bench.harness import LiveRows, bench_main, measure, progress, provenance, save_results  # noqa: E402

SCRIPT = "bench_distill"
BASELINE = "gather_sdpa_scatter"
EXTRA_COLUMNS = ["batch", "pattern"]
FLEX = "flex_attention(mask_mod+score_mod)"
MODE = "fwd+bwd+adamw"


def planned_rows(targets=True):
    """The rows a GPU run writes (``--targets``: only the two the targets compare), without running it."""
    backends = (BASELINE, "sam_fast(triton)") + (() if targets else (FLEX,))
    return [dict(op="distill_step", case="vit_b dilated-global b8", backend=b, mode=MODE) for b in backends]


# ------------------------------------------------------------------------------------------------
# The peers' attention, inside the same SAM block
# ------------------------------------------------------------------------------------------------


def _groups(pattern, grid, heads, device):
    """(heads tensor, (n_seg, kept) token index, kept-token rows, cols of one segment) per offset group."""
    from sam_fast.bench.bench_dilated_attention import _gather_index, _head_groups, _resolved
    from sam_fast.reference.dilated_attention import _segment_tokens

    (br,) = _resolved(pattern, grid[0] * grid[1], grid)
    out = []
    for (oy, ox), hs in _head_groups(br, heads).items():
        ys, xs, _ = _segment_tokens(br, 0, 0, oy, ox, padded=False)
        out.append((torch.tensor(hs, device=device), _gather_index(br, oy, ox).to(device), ys.to(device),
                    xs.to(device)))  # on the device once: no index copies inside the timed step
    return out


class PeerBlock(nn.Module):
    """A SAM ViT block (sharing a :class:`sam_fast.nn.SamFastBlock`'s submodules) whose dilated attention is
    computed by a peer method: ``"gather_sdpa_scatter"`` or ``"flex"``. Single-branch patterns whose segments
    all keep equally many tokens (the gather peer needs it); rel-pos tables must span the grid."""

    def __init__(self, block: nn.Module, method: str):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        if block.pattern is None or len(block.pattern) != 1:
            raise ValueError("the peers take one dilated branch")
        self.pattern, self.method = block.pattern, method
        self._plan = None

    def _attention(self, q, k, v, grid):
        B, N, H, D = q.shape
        rel_h, rel_w = self.attn.rel_pos_h, self.attn.rel_pos_w
        if rel_h.shape[0] != 2 * grid[0] - 1 or rel_w.shape[0] != 2 * grid[1] - 1:
            raise ValueError("the peers need rel-pos tables that span the grid (a global block)")
        if self.method == "flex":
            return self._flex(q, k, v, grid)
        from sam_fast.reference.dilated_attention import _rel_bias

        if self._plan is None:
            self._plan = _groups(self.pattern, grid, H, q.device)
        out = q.new_zeros(B, N, H, D)
        for heads, idx, ys, xs in self._plan:
            nseg, kept = idx.shape
            flat = idx.reshape(-1)
            qg, kg, vg = (t[:, flat][:, :, heads].reshape(B, nseg, kept, len(heads), D).transpose(2, 3)
                          .reshape(B * nseg, len(heads), kept, D) for t in (q, k, v))
            bias = _rel_bias(qg, rel_h, ys, ys) + _rel_bias(qg, rel_w, xs, xs)  # segments share the layout
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias.to(qg.dtype), scale=self.attn.scale)
            out[:, flat[:, None], heads[None, :]] = (o.reshape(B, nseg, len(heads), kept, D).transpose(2, 3)
                                                     .reshape(B, nseg * kept, len(heads), D))
        return out

    def _flex(self, q, k, v, grid):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        B, N, H, D = q.shape
        Hg, Wg = grid
        (b0,) = self.pattern
        (sh, sw), (dh, dw) = b0.segment, b0.dilation
        if self._plan is None:
            def mask_mod(b, h, q_idx, kv_idx):
                qy, qx, ky, kx = q_idx // Wg, q_idx % Wg, kv_idx // Wg, kv_idx % Wg
                oy, ox = (h // dw) % dh, h % dw
                same = (qy // sh == ky // sh) & (qx // sw == kx // sw)
                return same & ((qy % sh) % dh == oy) & ((qx % sw) % dw == ox) & ((ky % sh) % dh == oy) & \
                    ((kx % sw) % dw == ox)

            self._plan = (create_block_mask(mask_mod, B=None, H=H, Q_LEN=N, KV_LEN=N, device=q.device),
                          torch.compile(flex_attention, dynamic=False))
        block_mask, flex = self._plan
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        # q's projections onto the tables: proj_h[b, h, n, r] = q[b, h, n] . rel_pos_h[r]
        proj_h = torch.matmul(qt, self.attn.rel_pos_h.to(qt.dtype).t())
        proj_w = torch.matmul(qt, self.attn.rel_pos_w.to(qt.dtype).t())

        def score_mod(score, b, h, q_idx, kv_idx):
            qy, qx, ky, kx = q_idx // Wg, q_idx % Wg, kv_idx // Wg, kv_idx % Wg
            return score + proj_h[b, h, q_idx, qy - ky + Hg - 1] + proj_w[b, h, q_idx, qx - kx + Wg - 1]

        out = flex(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, scale=self.attn.scale)
        return out.transpose(1, 2)

    def forward(self, x):
        B, Hg, Wg, C = x.shape
        heads = self.attn.num_heads
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(B, Hg * Wg, 3, heads, -1).unbind(2)
        x = x + self.attn.proj(self._attention(q, k, v, (Hg, Wg)).reshape(B, Hg, Wg, -1))
        return x + self.mlp(self.norm2(x))


def with_peer(student: nn.Module, method: str) -> nn.Module:
    """A copy of a dilated student whose dilated blocks compute attention by ``method``."""
    from sam_fast.nn.attention import SamFastBlock

    peer = copy.deepcopy(student)
    blocks = peer.image_encoder.blocks
    for i, b in enumerate(blocks):
        if isinstance(b, SamFastBlock) and b.pattern is not None:
            blocks[i] = PeerBlock(b, method)
    return peer


# ------------------------------------------------------------------------------------------------
# The training step
# ------------------------------------------------------------------------------------------------


def _case(gpu: bool, quick: bool):
    from sam_fast import Branch

    if gpu:
        from sam_fast.models import build_sam

        torch.manual_seed(0)
        teacher = build_sam("vit_b")
        return "vit_b", teacher, [Branch((64, 64), (2, 2))], 2 if quick else 8
    from sam_fast.models import tiny_sam

    return "tiny", tiny_sam(), [Branch((16, 16), (2, 1))], 2


def make_step(student: nn.Module, batch, targets, bf16: bool):
    """The DLD training step of sam_fast.distill on a fixed batch: returns step() -> loss."""
    from sam_fast.distill.schedule import DLDSchedule
    from sam_fast.distill.train import StudentStep, weighted_total

    step_module = StudentStep(student, None)
    params = list(student.image_encoder.parameters())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    schedule = DLDSchedule()
    depth = len(student.image_encoder.blocks)
    weights = dict(enumerate(schedule.weights(depth, 0.3)))
    blocks = list(range(depth))
    data = {"image": batch, **targets}

    def autocast():
        return torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        opt.zero_grad(set_to_none=True)
        terms = step_module(data, stage="encoder", method="dld", blocks=blocks, run_decoder=None, autocast=autocast)
        loss = weighted_total(terms, "dld", weights, schedule, 1.0, 1.0).mean()
        loss.backward()
        opt.step()
        return loss

    return step


def run(out_dir: str, quick: bool = False, device: str = None, targets: bool = False):
    from sam_fast.distill import dilated_student
    from sam_fast.distill.cache import BlockOutputs

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    prov = provenance(dev)
    name, teacher, pattern, batch = _case(gpu, quick and not targets)
    teacher = teacher.to(dev).eval()
    enc = teacher.image_encoder
    x = torch.randn(batch, 3, enc.img_size, enc.img_size, device=dev, generator=torch.Generator(device=dev)
                    .manual_seed(0))
    with torch.no_grad(), BlockOutputs(enc, range(len(enc.blocks))) as rec:
        emb = enc(x)
    targets_ = {"embedding": emb.float(), "blocks": {i: t.float() for i, t in rec.outputs.items()}}
    kind = "dilated-global" if gpu else "dilated"
    case = f"{name} {kind} b{batch}"
    pat = "+".join(f"2d{b.segment}r{b.dilation}" for b in pattern).replace(" ", "")
    ours = "sam_fast(triton)" if gpu else "sam_fast(cpu)"
    backends = [(ours, None), (BASELINE, "gather_sdpa_scatter")]  # ours first: the peers' losses compare to it
    if gpu and not quick and not targets:
        backends.append((FLEX, "flex"))
    rows = LiveRows(out_dir, SCRIPT, EXTRA_COLUMNS)
    reference_loss = None
    for backend, peer in progress(backends, "distill step", lambda b: b[0]):
        student = dilated_student(teacher, pattern, backend="triton" if gpu else "cpu")
        if peer is not None:
            student = with_peer(student, peer)
        student.train(False)
        row = dict(prov, op="distill_step", case=case, backend=backend, mode=MODE, batch=batch,
                   pattern=pat, metric="images/s")
        try:
            step = make_step(student, x, targets_, bf16=gpu)
            first = float(step())
            t = measure(step, dev, warmup_ms=100, rep_ms=200 if targets else 500, cpu_reps=3)
        except Exception as exc:  # a peer that cannot run this case is a row that says why, not a crash
            rows.append(dict(row, median_ms="", note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
            continue
        if backend == ours:
            reference_loss = first
        row.update(t, value=batch / (t["median_ms"] / 1e3),
                   max_err=abs(first - reference_loss) if reference_loss is not None else "")
        rows.append(row)
        del student, step
        if gpu:
            torch.cuda.empty_cache()
    return save_results(out_dir, SCRIPT, rows, BASELINE, f"distillation step, {prov['device']}, {prov['git_sha']}",
                        EXTRA_COLUMNS)


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
