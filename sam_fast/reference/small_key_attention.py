"""Reference of the mask decoder's image-to-token attention (``sam_fast.ops.small_key_attention``): plain
PyTorch, prompt by prompt."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def small_key_attention(q: torch.Tensor, q_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        num_heads: int) -> torch.Tensor:
    """out[p] = softmax(q[q_index[p]] k[p]^T / sqrt(D)) v[p], per head: (G, N, H*D), (P,), (P, T, H*D) x 2.

    Prompts sharing a query row are computed together, as one (H, N, D) x (H, D, n*T) product with the
    softmax taken per prompt, so shared queries are never copied per prompt.
    """
    P, T, C = k.shape
    N = q.shape[1]
    H, D = num_heads, C // num_heads
    out = q.new_empty((P, N, C))
    if P == 0:
        return out
    if q.shape[0] == P and torch.equal(q_index, torch.arange(P, device=q_index.device)):
        split = lambda t: t.view(t.shape[0], t.shape[1], H, D).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return o.transpose(1, 2).reshape(P, N, C)
    for g in torch.unique(q_index).tolist():
        sel = torch.nonzero(q_index == g).flatten()
        n = sel.numel()
        qh = q[g].view(N, H, D).transpose(0, 1)  # (H, N, D)
        kt = k[sel].view(n, T, H, D).permute(2, 3, 0, 1).reshape(H, D, n * T)
        probs = ((qh @ kt) * D ** -0.5).view(H, N, n, T).softmax(dim=-1)
        out[sel] = torch.einsum("hnpt,pthd->pnhd", probs, v[sel].view(n, T, H, D)).reshape(n, N, C)
    return out
