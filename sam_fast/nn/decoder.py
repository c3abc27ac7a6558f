"""``BatchedMaskDecoder``: SAM's prompt encoder + mask decoder over many images and prompts in one call.

segment_anything decodes one image at a time and copies the (256, 64, 64) image embedding and its
positional encoding once per prompt (``repeat_interleave``) before the two-way transformer. Here one
call takes

    image_embeddings (I, C, h, w)   and, flattened over all images,
    image_index (P,)                which image each prompt belongs to,
    point_coords (P, n, 2), point_labels (P, n), boxes (P, 4), mask_inputs (P, 1, 4h, 4w)

and nothing image-sized is ever copied per prompt:

* the first two-way block's image-side work - keys + positional encoding, the token-to-image keys and
  values, the image-to-token queries - depends only on the image (when no mask prompt is given), so it
  is computed once per image;
* token-to-image attention of all prompts of one image is one attention call whose queries are the
  prompts' tokens stacked (each query token attends independently, so stacking is exact);
* image-to-token attention (4096 queries over a prompt's 5-10 tokens) is ``sam_fast::small_key_attention``,
  a Triton kernel that holds all of a prompt's keys in registers and reads the first block's
  image-level queries shared, through an index, by all prompts of the image.

From the first block's output on the keys differ per prompt and the decoder runs batched over prompts
with ``scaled_dot_product_attention``; only the mask tokens asked for (one, or the three multimask
ones) go through the hypernetwork product, and on CUDA that product is fused with the last upscaling
convolution and its GELU (``sam_fast::upscale_mask_product``, a Triton kernel), so the largest tensor
of the decoder, the (C/8, 4h, 4w) upscaled embedding per prompt, is never written. Parameters are the wrapped
segment_anything modules'
(``from_sam`` shares them), so state_dict keys are Sam's ``prompt_encoder.*`` / ``mask_decoder.*``.

SAM 2's prompt encoder and mask decoder (Meta's ``sam2`` package) take the same path: the same two-way
transformer, plus an object-score token before the IoU token, point labels 2 / 3 (box corners given as
points), the high-resolution skip features of the image encoder's first two stages added inside the
upscaling (per image, through the index: the stride-4 one inside the fused kernel), and, for a single
mask, the choice by stability among the multimask outputs (``dynamic_multimask_via_stability``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import check_backend_name, note_fallback
from .._hooks import has_hooks
from ..ops.small_key_attention import small_key_attention
from ..ops.upscale_mask_product import upscale_mask_product


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, heads, T, C / heads)."""
    B, T, C = x.shape
    return x.view(B, T, num_heads, C // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> (B, T, heads * d)."""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's ``Attention.forward`` on its own weights, through SDPA."""
    out = F.scaled_dot_product_attention(_heads(attn.q_proj(q), attn.num_heads),
                                         _heads(attn.k_proj(k), attn.num_heads),
                                         _heads(attn.v_proj(v), attn.num_heads))
    return attn.out_proj(_merge(out))


def _per_prompt(feat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Image-level features (I, ...) for prompts of images ``index``: broadcast when there is one image (no copy)."""
    return feat if feat.shape[0] == 1 else feat[index]


def _channel_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM's ``LayerNorm2d`` (over the channels of each pixel, written with mean / var passes) as one fused
    ``layer_norm`` on the channels-last view; any other module as it is."""
    if type(norm).__name__ != "LayerNorm2d" or not all(hasattr(norm, a) for a in ("weight", "bias", "eps")):
        return norm(x)
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)


class BatchedMaskDecoder(nn.Module):
    """Batched drop-in for ``Sam.prompt_encoder`` + ``Sam.mask_decoder`` (see the module docstring).

    Args:
        prompt_encoder: a segment_anything ``PromptEncoder``.
        mask_decoder: a segment_anything ``MaskDecoder`` (its ``TwoWayTransformer`` included).
        backend: backend of the fused upscaling + mask product ("auto": Triton on CUDA, the PyTorch
            reference on CPU; "triton" runs the kernel under TRITON_INTERPRET=1 on CPU, for tests).
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, backend: str = "auto"):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.backend = check_backend_name(backend)

    @classmethod
    def from_sam(cls, sam: nn.Module, backend: str = "auto") -> "BatchedMaskDecoder":
        """Wrap a ``Sam``'s prompt encoder and mask decoder, or a SAM 2 model's ``sam_prompt_encoder`` and
        ``sam_mask_decoder`` (parameters shared, not copied)."""
        prefix = "sam_" if isinstance(getattr(sam, "sam_mask_decoder", None), nn.Module) else ""
        for name in ("prompt_encoder", "mask_decoder"):
            if not isinstance(getattr(sam, prefix + name, None), nn.Module):
                raise TypeError(f"sam must be a segment_anything Sam (or a SAM 2 model) with a {name}, got "
                                f"{type(sam).__name__}")
        return cls(getattr(sam, prefix + "prompt_encoder"), getattr(sam, prefix + "mask_decoder"), backend)

    @property
    def is_sam2(self) -> bool:
        """Whether the wrapped decoder is SAM 2's (object-score token, high-resolution features, labels 2 / 3)."""
        return hasattr(self.mask_decoder, "pred_obj_scores")

    def _fusable_tail(self):
        """The last ConvTranspose2d when output_upscaling ends in SAM's ConvTranspose2d(k=2, s=2) + exact GELU (what
        the fused kernel computes), else None."""
        seq = self.mask_decoder.output_upscaling
        if not isinstance(seq, nn.Sequential) or len(seq) < 2:
            return None
        conv, act = seq[-2], seq[-1]
        if not (isinstance(conv, nn.ConvTranspose2d) and isinstance(act, nn.GELU) and act.approximate == "none"
                and conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.padding == (0, 0)
                and conv.output_padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.bias is not None):
            return None
        return conv

    # -- inputs -----------------------------------------------------------------------------------------

    def _check(self, image_embeddings, image_index, point_coords, point_labels, boxes, mask_inputs,
               high_res_features=None):
        if not isinstance(image_embeddings, torch.Tensor) or image_embeddings.dim() != 4:
            raise ValueError("image_embeddings must be a (I, C, h, w) tensor, got "
                             f"{getattr(image_embeddings, 'shape', type(image_embeddings).__name__)}")
        I, C, h, w = image_embeddings.shape
        emb = tuple(self.prompt_encoder.image_embedding_size)
        if C != self.mask_decoder.transformer_dim or (h, w) != emb:
            raise ValueError(f"image_embeddings must have shape (I, {self.mask_decoder.transformer_dim}, "
                             f"{emb[0]}, {emb[1]}), got {tuple(image_embeddings.shape)}")
        if not isinstance(image_index, torch.Tensor) or image_index.dim() != 1:
            raise ValueError(f"image_index must be a 1-d tensor of image indices, got {image_index!r}")
        if image_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"image_index must be int64 or int32, got {image_index.dtype}")
        P = image_index.shape[0]
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None:
            if point_coords.dim() != 3 or point_coords.shape[0] != P or point_coords.shape[2] != 2:
                raise ValueError(f"point_coords must have shape ({P}, n, 2), got {tuple(point_coords.shape)}")
            if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
                raise ValueError(f"point_labels must have shape {tuple(point_coords.shape[:2])}, got "
                                 f"{tuple(point_labels.shape)}")
        if boxes is not None and tuple(boxes.shape) not in ((P, 4), (P, 1, 4)):
            raise ValueError(f"boxes must have shape ({P}, 4) (or ({P}, 1, 4) as SamPredictor passes them), got "
                             f"{tuple(boxes.shape)}")
        if mask_inputs is not None:
            want = (P, 1, 4 * emb[0], 4 * emb[1])
            if tuple(mask_inputs.shape) != want:
                raise ValueError(f"mask_inputs must have shape {want}, got {tuple(mask_inputs.shape)}")
        if point_coords is None and boxes is None and mask_inputs is None and P:
            raise ValueError("each prompt needs point_coords, boxes or mask_inputs; none were given")
        self._check_high_res(high_res_features, I, image_embeddings.device, emb)
        if P:
            self._check_values(I, image_index, point_coords, point_labels, boxes, mask_inputs,
                               3 if self.is_sam2 else 1)

    def _check_high_res(self, high_res_features, I, device, emb):
        """SAM 2's (feat_s0 (I, C/8, 4h, 4w), feat_s1 (I, C/4, 2h, 2w)), required exactly when the decoder uses them."""
        wanted = bool(getattr(self.mask_decoder, "use_high_res_features", False))
        if not wanted:
            if high_res_features is not None:
                raise ValueError("high_res_features given, but this mask decoder does not use high-resolution "
                                 "features")
            return
        if not isinstance(high_res_features, (list, tuple)) or len(high_res_features) != 2:
            raise ValueError("this SAM 2 mask decoder needs high_res_features: a (feat_s0, feat_s1) pair, got "
                             f"{type(high_res_features).__name__}")
        C = self.mask_decoder.transformer_dim
        for name, feat, c, f in (("feat_s0", high_res_features[0], C // 8, 4), ("feat_s1", high_res_features[1],
                                                                                C // 4, 2)):
            want = (I, c, f * emb[0], f * emb[1])
            if not isinstance(feat, torch.Tensor) or tuple(feat.shape) != want:
                raise ValueError(f"high_res_features' {name} must have shape {want}, got "
                                 f"{tuple(getattr(feat, 'shape', ())) or type(feat).__name__}")
            if not feat.is_floating_point():
                raise TypeError(f"high_res_features' {name} must be a float tensor, got {feat.dtype}")
            if feat.device != device:
                raise ValueError(f"high_res_features' {name} must be on {device} with image_embeddings, got "
                                 f"{feat.device}")

    @staticmethod
    def _check_values(I, image_index, point_coords, point_labels, boxes, mask_inputs, max_label=1):
        """Index range, point labels and finite prompts, read back from the device in one synchronisation."""
        named = [(n, t) for n, t in (("point_coords", point_coords), ("boxes", boxes), ("mask_inputs", mask_inputs))
                 if t is not None and t.numel()]
        probes = [image_index.min(), image_index.max()] + [(~torch.isfinite(t)).any() for _, t in named]
        has_labels = point_labels is not None and point_labels.numel() > 0
        if has_labels:
            probes += [point_labels.min(), point_labels.max()]
        lo, hi, *rest = torch.stack([v.to(torch.int64) for v in probes]).tolist()
        nonfinite = rest[:len(named)]
        if lo < 0 or hi >= I:
            raise ValueError(f"image_index must lie in [0, {I}), got values in [{lo}, {hi}]")
        if has_labels and (rest[-2] < -1 or rest[-1] > max_label):
            # SAM's prompt encoder embeds these; any other label would get no label embedding at all
            extra = ", 2 / 3 (box corners)" if max_label == 3 else ""
            raise ValueError(f"point_labels must be 1 (foreground), 0 (background){extra} or -1 (padding), got "
                             f"values in [{rest[-2]}, {rest[-1]}]")
        for (name, _), bad in zip(named, nonfinite):
            if bad:
                raise ValueError(f"{name} holds NaN or infinite values")

    # -- the decoder ------------------------------------------------------------------------------------

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        high_res_features: Optional[Sequence[torch.Tensor]] = None,
        return_object_scores: bool = False,
    ):
        """Decode P prompts over I images.

        Coordinates are in the encoder's input frame (after ``ResizeLongestSide`` for SAM; SAM 2's 1024 x 1024
        frame for SAM 2), as the predictors' ``predict_torch`` / ``_predict`` take them. SAM 2's decoder also
        needs ``high_res_features`` = (feat_s0 (I, C/8, 4h, 4w), feat_s1 (I, C/4, 2h, 2w)), the image
        encoder's first two levels after the decoder's ``conv_s0`` / ``conv_s1`` (``SAM2ImagePredictor``'s
        ``_features["high_res_feats"]``).

        Returns ``(low_res_logits (P, M, 4h, 4w), iou_predictions (P, M))`` with M = 3 for
        ``multimask_output`` else 1, in the prompts' order; with ``return_object_scores`` also the object
        score logits (P, 1) (SAM 2's object-score head; 10.0 for a decoder without one, as SAM 2 does).
        """
        self._check(image_embeddings, image_index, point_coords, point_labels, boxes, mask_inputs,
                    high_res_features)
        if has_hooks(*self.prompt_encoder.modules(), *self.mask_decoder.modules()):
            note_fallback("batched_mask_decoder", "reference", "modules of the prompt encoder or mask decoder have "
                          "hooks: the original modules run, image by image, so that they do")
            out = self._module_forward(image_embeddings, image_index, point_coords, point_labels, boxes,
                                       mask_inputs, multimask_output, high_res_features)
            return out if return_object_scores else out[:2]
        dec = self.mask_decoder
        dtype = dec.iou_token.weight.dtype
        P = image_index.shape[0]
        M = dec.num_mask_tokens - 1 if multimask_output else 1
        h, w = image_embeddings.shape[-2:]
        if P == 0:
            empty = image_embeddings.new_zeros((0, M, 4 * h, 4 * w), dtype=dtype)
            out = (empty, image_embeddings.new_zeros((0, M), dtype=dtype))
            return out + (image_embeddings.new_zeros((0, 1), dtype=dtype),) if return_object_scores else out

        boxes = None if boxes is None else boxes.reshape(P, 4)
        sparse, dense = self._encode_prompts(point_coords, point_labels, boxes, mask_inputs, P)
        pe = self.dense_pe().to(dtype).flatten(2).transpose(1, 2)  # (1, N, C)
        if mask_inputs is None:
            # The dense prompt is the same "no mask" embedding for all: image-level keys.
            no_mask = self.prompt_encoder.no_mask_embed.weight.to(dtype).reshape(1, -1, 1, 1)
            keys0 = (image_embeddings.to(dtype) + no_mask).flatten(2).transpose(1, 2)  # (I, N, C)
            group = image_index.long()
        else:
            keys0 = (image_embeddings.to(dtype)[image_index.long()] + dense.to(dtype)).flatten(2).transpose(1, 2)
            group = torch.arange(P, device=image_index.device)

        # Prompts sorted by group, so that each group's prompts are one contiguous slice (the predictor
        # and the mask generator pass them sorted already: then nothing is permuted).
        order = None if P < 2 or bool((group[1:] >= group[:-1]).all()) else torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=keys0.shape[0]).tolist()
        s = 1 if getattr(dec, "pred_obj_scores", False) else 0  # SAM 2's object-score token comes first
        output_tokens = torch.cat(([dec.obj_score_token.weight] if s else []) + [dec.iou_token.weight,
                                                                                  dec.mask_tokens.weight], dim=0)
        sparse = sparse.to(dtype) if order is None else sparse.to(dtype)[order]
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(P, -1, -1), sparse], dim=1)

        transformer = dec.transformer
        queries, keys = self._first_block(transformer.layers[0], tokens, keys0, pe, counts)
        for layer in transformer.layers[1:]:
            queries, keys = self._block(layer, queries, keys, tokens, pe)
        attn_out = _attend(transformer.final_attn_token_to_image, queries + tokens, keys + pe, keys)
        queries = transformer.norm_final_attn(queries + attn_out)

        iou_pred = dec.iou_prediction_head(queries[:, s, :])
        if s:
            object_scores = dec.pred_obj_score_head(queries[:, 0, :])
        else:
            object_scores = 10.0 * iou_pred.new_ones(P, 1)
        dynamic = (not multimask_output and getattr(dec, "dynamic_multimask_via_stability", False)
                   and not dec.training)
        first = 1 if multimask_output else 0
        count = dec.num_mask_tokens if dynamic else M
        wanted = range(first, first + count)
        src = keys.transpose(1, 2).reshape(P, -1, h, w)
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](queries[:, s + 1 + i, :]) for i in wanted], dim=1)
        skip_index = None
        if high_res_features is not None:  # each prompt's image, in the decoder's (sorted) prompt order
            skip_index = image_index.long() if order is None else image_index.long()[order]
        masks = self._upscale_product(src, hyper, high_res_features, skip_index)
        iou_pred = iou_pred[:, first:first + count]
        if dynamic:
            masks, iou_pred = self._stable_single_mask(masks, iou_pred)
        out = (masks, iou_pred, object_scores)
        if order is not None:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(P, device=order.device)
            out = tuple(t[inverse] for t in out)
        return out if return_object_scores else out[:2]

    def _upscale_product(self, src, hyper, high_res_features, skip_index):
        """``output_upscaling`` (SAM 2: with its high-resolution features added) and the hypernetwork product."""
        dec = self.mask_decoder
        conv = self._fusable_tail()
        if high_res_features is not None:
            dc2, act2 = dec.output_upscaling[-2:]  # SAM 2's layout (dc1, ln1, act1, dc2, act2), as it unpacks it
            feat_s0, feat_s1 = (f.to(src.dtype) for f in high_res_features)
            stem = self._stem(src, _per_prompt(feat_s1, skip_index))
            if conv is not None:
                return self._fused(stem, conv, hyper, feat_s0, skip_index)
            upscaled = act2(dc2(stem) + _per_prompt(feat_s0, skip_index))
        elif conv is not None:
            return self._fused(self._stem(src), conv, hyper)
        else:  # an output_upscaling of another shape: the unfused product
            upscaled = dec.output_upscaling(src)
        B, c, uh, uw = upscaled.shape
        return (hyper @ upscaled.view(B, c, uh * uw)).view(B, -1, uh, uw)

    def _stem(self, src, skip=None):
        """``output_upscaling`` up to its last convolution (SAM's and SAM 2's: ConvTranspose2d, LayerNorm2d, GELU),
        the LayerNorm2d as one fused ``layer_norm``; SAM 2 adds its stride-8 features after the first convolution."""
        x = src
        for i, module in enumerate(self.mask_decoder.output_upscaling[:-2]):
            x = _channel_norm(module, x)
            if i == 0 and skip is not None:
                x = x + skip
        return x

    def _fused(self, x, conv, hyper, skip=None, skip_index=None):
        """The fused last upscaling + product, all its inputs in one dtype: the autocast dtype where autocast is on
        (as the unfused convolution and product would run), else x's."""
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        return upscale_mask_product(x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype), hyper.to(dtype),
                                    None if skip is None else skip.to(dtype), skip_index, backend=self.backend,
                                    check_index=False)  # skip_index: built from the validated image_index

    def _stable_single_mask(self, masks, iou_pred):
        """SAM 2's single-mask choice: the single-mask output where its stability score (area above +delta over
        area above -delta) reaches the threshold, else the multimask output of highest predicted IoU."""
        dec = self.mask_decoder
        delta = dec.dynamic_multimask_stability_delta
        single = masks[:, 0:1]
        flat = single.flatten(-2)
        inter = (flat > delta).sum(-1).float()
        union = (flat > -delta).sum(-1).float()
        stable = torch.where(union > 0, inter / union, 1.0) >= dec.dynamic_multimask_stability_thresh  # (P, 1)
        best = iou_pred[:, 1:].argmax(dim=-1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        best_masks = masks[:, 1:][rows, best].unsqueeze(1)
        best_iou = iou_pred[:, 1:][rows, best].unsqueeze(1)
        return (torch.where(stable[..., None, None], single, best_masks),
                torch.where(stable, iou_pred[:, 0:1], best_iou))

    def _module_forward(self, image_embeddings, image_index, point_coords, point_labels, boxes, mask_inputs,
                        multimask_output, high_res_features=None):
        """:meth:`forward` through the original modules (their hooks run), one image at a time, as
        ``SamPredictor.predict_torch`` / ``SAM2ImagePredictor._predict`` call them: (low-res logits, IoU
        predictions, object score logits)."""
        P = image_index.shape[0]
        low = iou = obj = None
        for i in image_index.unique().tolist():
            sel = (image_index == i).nonzero().squeeze(1)
            sparse, dense = self.prompt_encoder(
                points=None if point_coords is None else (point_coords[sel], point_labels[sel]),
                boxes=None if boxes is None else boxes.reshape(P, 4)[sel],
                masks=None if mask_inputs is None else mask_inputs[sel])
            kwargs = dict(image_embeddings=image_embeddings[i:i + 1], image_pe=self.prompt_encoder.get_dense_pe(),
                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                          multimask_output=multimask_output)
            if self.is_sam2:
                kwargs.update(repeat_image=True, high_res_features=None if high_res_features is None else
                              [f[i:i + 1] for f in high_res_features])
                masks, scores, _, objects = self.mask_decoder(**kwargs)
            else:
                masks, scores = self.mask_decoder(**kwargs)
                objects = 10.0 * scores.new_ones(scores.shape[0], 1)
            if low is None:
                low = masks.new_empty((P, *masks.shape[1:]))
                iou = scores.new_empty((P, *scores.shape[1:]))
                obj = objects.new_empty((P, 1))
            low[sel], iou[sel], obj[sel] = masks, scores, objects
        return low, iou, obj

    # -- prompt encoding ----------------------------------------------------------------------------------
    # segment_anything's PromptEncoder, with its random-Fourier positional encoding always in float32:
    # segment_anything multiplies float32 coordinates by the encoder's Gaussian matrix, which fails once
    # the model is cast to bf16 (and would lose the coordinates' precision if it did not).

    def _fourier(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates in [0, 1] -> (..., C) float32 (PositionEmbeddingRandom._pe_encoding)."""
        gauss = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.float()
        proj = (2 * coords.float() - 1) @ gauss * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def dense_pe(self) -> torch.Tensor:
        """``PromptEncoder.get_dense_pe()`` in float32: (1, C, h, w)."""
        h, w = self.prompt_encoder.image_embedding_size
        device = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=device, dtype=torch.float32)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        return self._fourier(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)

    def _encode_prompts(self, coords, labels, boxes, masks, P):
        """``PromptEncoder.forward``: sparse (P, n, C) float32 and dense (P, C, h, w) embeddings."""
        enc = self.prompt_encoder
        in_h, in_w = enc.input_image_size
        scale = torch.tensor([in_w, in_h], dtype=torch.float32, device=enc.no_mask_embed.weight.device)
        parts = []
        if coords is not None:
            points = coords.float() + 0.5  # pixel centres
            if boxes is None:  # a "not a point" pad token, as segment_anything adds
                points = torch.cat([points, points.new_zeros((P, 1, 2))], dim=1)
                labels = torch.cat([labels, -labels.new_ones((P, 1))], dim=1)
            emb = self._fourier(points / scale)
            emb = torch.where((labels == -1).unsqueeze(-1), enc.not_a_point_embed.weight.float(), emb)
            emb = emb + (labels == 0).unsqueeze(-1) * enc.point_embeddings[0].weight.float()
            emb = emb + (labels == 1).unsqueeze(-1) * enc.point_embeddings[1].weight.float()
            if self.is_sam2:  # box corners given as points (_check_values refuses labels 2 / 3 for SAM)
                emb = emb + (labels == 2).unsqueeze(-1) * enc.point_embeddings[2].weight.float()
                emb = emb + (labels == 3).unsqueeze(-1) * enc.point_embeddings[3].weight.float()
            parts.append(emb)
        if boxes is not None:
            corners = self._fourier((boxes.float() + 0.5).reshape(-1, 2, 2) / scale)
            corner_pe = [enc.point_embeddings[2].weight[0], enc.point_embeddings[3].weight[0]]
            corners = corners + torch.stack(corner_pe).float()
            parts.append(corners)
        sparse = torch.cat(parts, dim=1) if parts else scale.new_zeros((P, 0, enc.embed_dim))
        dense = enc.mask_downscaling(masks.to(enc.no_mask_embed.weight.dtype)) if masks is not None else None
        return sparse, dense

    def _image_to_token(self, attn, image_side, q_index, token_keys, token_values):
        """segment_anything's image-to-token Attention: image tokens (rows of image_side, shared by the
        prompts through q_index) attend to each prompt's few tokens (sam_fast::small_key_attention)."""
        out = small_key_attention(attn.q_proj(image_side), q_index, attn.k_proj(token_keys),
                                  attn.v_proj(token_values), attn.num_heads, backend=self.backend,
                                  check_index=False)  # built here: an arange, or the validated image groups
        return attn.out_proj(out)

    def _block(self, layer, queries, keys, query_pe, key_pe):
        """A TwoWayAttentionBlock with per-prompt keys (segment_anything's order of operations)."""
        if layer.skip_first_layer_pe:
            queries = _attend(layer.self_attn, queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + _attend(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)
        k = keys + key_pe
        queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        own = torch.arange(keys.shape[0], device=keys.device)
        keys = layer.norm4(keys + self._image_to_token(layer.cross_attn_image_to_token, k, own,
                                                       queries + query_pe, queries))
        return queries, keys

    def _first_block(self, layer, tokens, keys0, pe, counts):
        """The first block, with image-level keys0 (G, N, C) shared by counts[g] consecutive prompts."""
        if all(n == 1 for n in counts):  # one prompt per group (e.g. mask prompts): nothing to share
            return self._block(layer, tokens, keys0, tokens, pe)
        queries = tokens
        if layer.skip_first_layer_pe:
            queries = _attend(layer.self_attn, queries, queries, queries)
        else:
            queries = queries + _attend(layer.self_attn, queries + tokens, queries + tokens, queries)
        queries = layer.norm1(queries)

        k_img = keys0 + pe  # (G, N, C), once per image
        P, T, _ = queries.shape
        # Token-to-image: per image, all its prompts' tokens as one query sequence.
        t2i = layer.cross_attn_token_to_image
        heads = t2i.num_heads
        K = _heads(t2i.k_proj(k_img), heads)
        V = _heads(t2i.v_proj(keys0), heads)
        Q = t2i.q_proj(queries + tokens)  # (P, T, Ci)
        out = torch.empty_like(Q)
        start = 0
        for g, n in enumerate(counts):
            if n:
                q = _heads(Q[start:start + n].reshape(1, n * T, -1), heads)
                out[start:start + n] = _merge(F.scaled_dot_product_attention(q, K[g:g + 1], V[g:g + 1])).view(n, T, -1)
            start += n
        queries = layer.norm2(queries + t2i.out_proj(out))
        queries = layer.norm3(queries + layer.mlp(queries))

        # Image-to-token: the image-level queries serve every prompt of their image.
        group = torch.repeat_interleave(torch.arange(len(counts), device=tokens.device),
                                        torch.tensor(counts, device=tokens.device))
        keys = self._image_to_token(layer.cross_attn_image_to_token, k_img, group, queries + tokens, queries)
        start = 0
        for g, n in enumerate(counts):
            keys[start:start + n] += keys0[g]
            start += n
        return queries, layer.norm4(keys)
