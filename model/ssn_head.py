"""The SSN head: degradation / upgradation of the modification text and the composed query.

Symbols follow the paper (see docs/ssn.md): ``V`` image tokens [B, 1+P, d_img] (class token first),
``T`` text token states [B, L, w], ``m`` padding mask [B, L], ``e_img`` / ``e_txt`` projected
embeddings [B, D].  Parameter names are the official ones, so official head weights load unchanged.

Two differences from the official forward, neither changing its results on unpadded input:
* the fusion layer does not attend to padded text tokens (key padding mask);
* the fusion layer computes queries, attention output, norms and feed-forward only at the positions that
  are read afterwards (class token and text tokens; class token only for targets).  Keys and values are
  still computed for every token, so the outputs at the read positions are exactly those of
  ``nn.TransformerEncoderLayer``; patch tokens only cost a K/V projection.  That projection is linear
  and the selection weights are per-token scalars, so one projection of the tokens serves both the
  positive and the negative branch, which run as one batched call.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_TOKEN_TYPE = 0
TEXT_TOKEN_TYPE = 1
OUTPUT_SCALE = 0.01  # official weight of the learned residual against the CLIP embeddings


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens: tokens [B, L, C], mask [B, L] (1 = real) -> [B, C]."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # [B, L, 1]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class SSNHead(nn.Module):
    """Semantic Shift Network head on top of a CLIP backbone.

    Args:
        image_token_dim: width ``d_img`` of the vision transformer tokens.
        text_width: width ``w`` of the text transformer; also the head width.
        embed_dim: CLIP joint embedding size ``D``; the target branch adds a w-wide token to a D-wide
            embedding, so ``w == D`` is required (true of the OpenAI and OpenCLIP ViTs).
        nhead: attention heads of the fusion layer.
        dim_feedforward, dropout: of the fusion layer (official: 2048, 0.1).
    """

    def __init__(
        self,
        image_token_dim: int,
        text_width: int,
        embed_dim: int,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if text_width != embed_dim:
            raise ValueError(
                f"SSN needs the text width ({text_width}) to equal the embedding size ({embed_dim}): "
                "the target branch adds the fused class token to the image embedding"
            )
        if text_width % nhead:
            raise ValueError(f"text width {text_width} is not divisible by nhead={nhead}")
        width = text_width
        self.image_token_dim = image_token_dim
        self.width = width
        self.embed_dim = embed_dim
        self.nhead = nhead

        self.token_type_embeddings = nn.Embedding(2, width)
        self.text_token_selection_mask = nn.Sequential(nn.Linear(2 * width, 1), nn.Sigmoid())
        self.image_token_selection_mask = nn.Sequential(nn.Linear(2 * width, 1), nn.Sigmoid())
        self.image_token_proj_layer = nn.Linear(image_token_dim, width)
        encoder_layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout
        )
        # Kept as a one-layer TransformerEncoder for the official parameter names (fusion_layer.layers.0.*).
        self.fusion_layer = nn.TransformerEncoder(encoder_layer, num_layers=1, enable_nested_tensor=False)
        self.combiner_layer = nn.Linear(2 * width, 2 * width)
        self.output_layer = nn.Linear(2 * width, embed_dim)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 1), nn.Sigmoid()
        )

    # ------------------------------------------------------------------ fusion
    def _in_projection(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fusion layer's query and key/value projections: ``w_q`` [w, w], ``b_q``, ``w_kv`` [2w, w], ``b_kv``."""
        attn = self.fusion_layer.layers[0].self_attn
        w_q, w_kv = attn.in_proj_weight.split([self.width, 2 * self.width])
        b_q, b_kv = attn.in_proj_bias.split([self.width, 2 * self.width])
        return w_q, b_q, w_kv, b_kv

    def _attend(self, queries_in: Tensor, q: Tensor, kv: Tensor, attn_mask: Tensor | None) -> Tensor:
        """The rest of the post-norm encoder layer at the read positions.

        queries_in [B, R, w] (the layer's input there, for the residual); q [B, R, w] their projected
        queries; kv [B, N, 2w] keys and values of every token; attn_mask None or [B, 1, 1, N], True =
        attend.  Returns the layer's output [B, R, w].
        """
        layer = self.fusion_layer.layers[0]
        batch, _, width = queries_in.shape
        head_dim = width // self.nhead

        def split_heads(x: Tensor) -> Tensor:  # [B, n, w] -> [B, h, n, w/h]
            return x.view(batch, -1, self.nhead, head_dim).transpose(1, 2)

        k, v = kv.chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(
            split_heads(q), split_heads(k), split_heads(v),
            attn_mask=attn_mask, dropout_p=layer.self_attn.dropout if self.training else 0.0,
        )
        attended = layer.self_attn.out_proj(attended.transpose(1, 2).reshape(batch, -1, width))
        x = layer.norm1(queries_in + layer.dropout1(attended))
        feed_forward = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
        return layer.norm2(x + layer.dropout2(feed_forward))

    def _fuse(self, tokens: Tensor, read_positions: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """One post-norm encoder layer, evaluated only where its output is read.

        tokens [B, N, w]; read_positions [R] (indices into N); key_padding_mask [B, N], True = ignore.
        Returns [B, R, w], equal to ``fusion_layer(tokens)[:, read_positions]`` (batch-first).
        """
        w_q, b_q, w_kv, b_kv = self._in_projection()
        queries_in = tokens[:, read_positions]  # [B, R, w]
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        return self._attend(queries_in, F.linear(queries_in, w_q, b_q), F.linear(tokens, w_kv, b_kv), attn_mask)

    def _type_embedding(self, token_type: int, like: Tensor) -> Tensor:
        return self.token_type_embeddings.weight[token_type].to(like.dtype)

    # ------------------------------------------------------------------ degradation
    def selection_weights(
        self, ref_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The token selection weights: ``s_t`` [B, L] (1 = upgradation word, 0 = degradation word)
        and ``s_v`` [B, 1+P] (1 = kept in the visual prototype)."""
        _, s_t, s_v = self._decompose(ref_tokens, text_tokens, text_mask)
        return s_t.squeeze(-1), s_v.squeeze(-1)

    @staticmethod
    def _select(selection: nn.Sequential, tokens: Tensor, context: Tensor) -> Tensor:
        """``σ(Linear([tokens_i ; context]))`` [B, n, 1] for tokens [B, n, w] and one context [B, 1, w]
        per sample, without materialising the concatenation: the linear layer splits into a per-token
        and a per-sample part."""
        linear = selection[0]
        w_token, w_context = linear.weight.split(tokens.shape[-1], dim=-1)
        return selection[1](F.linear(tokens, w_token) + F.linear(context, w_context, linear.bias))

    def _decompose(self, ref_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        projected = self.image_token_proj_layer(ref_tokens)  # Ṽ [B, 1+P, w]
        s_t = self._select(self.text_token_selection_mask, text_tokens, projected[:, :1])  # σ([T_i ; g]) [B, L, 1]
        h = masked_mean(text_tokens * (1 - s_t), text_mask)  # mean of the degradation words T⁻ [B, w]
        s_v = self._select(self.image_token_selection_mask, projected, h[:, None])  # σ([Ṽ_j ; h]) [B, 1+P, 1]
        return projected, s_t, s_v

    # ------------------------------------------------------------------ composition
    @staticmethod
    def _branches(values: Tensor, selection: Tensor, offset: Tensor, with_negative: bool) -> Tensor:
        """``values·s + offset`` and, with the negative branch, ``values·(1 − s) + offset`` stacked on the
        batch axis: values [B, n, c], selection [B, n, 1], offset [n, c] -> [br·B, n, c]."""
        selected = values * selection
        if not with_negative:
            return selected + offset
        return torch.cat([selected + offset, values - selected + offset])

    def _compose(
        self,
        ref_tokens: Tensor,
        ref_embed: Tensor,
        text_tokens: Tensor,
        text_embed: Tensor,
        text_mask: Tensor,
        with_negative: bool,
    ) -> Tensor:
        projected, s_t, s_v = self._decompose(ref_tokens, text_tokens, text_mask)
        # Fusion input per branch: [Ṽ·s ; T·s_t] + token types, with s = s_v, s_t for branch 0 (prototype P
        # with upgradation words T⁺) and 1 − s for branch 1 (discarded part N with degradation words T⁻).
        # The selection weights are per-token scalars and the key/value projection is linear, so
        # W(x·s + type) + b = s·(W x) + (W type + b): one projection of the tokens serves both branches.
        w_q, b_q, w_kv, b_kv = self._in_projection()
        num_image, num_text = projected.shape[1], text_tokens.shape[1]
        types = torch.cat([
            self._type_embedding(IMAGE_TOKEN_TYPE, projected).expand(num_image, -1),
            self._type_embedding(TEXT_TOKEN_TYPE, text_tokens).expand(num_text, -1),
        ])  # [N, w]
        tokens = torch.cat([projected, text_tokens], dim=1)  # [B, N, w]
        selection = torch.cat([s_v, s_t], dim=1)  # [B, N, 1]
        kv = self._branches(F.linear(tokens, w_kv), selection, F.linear(types, w_kv, b_kv), with_negative)  # [br·B, N, 2w]
        # Only the class token and the text tokens are read: queries, norms and feed-forward there only.
        read = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(num_image, num_image + num_text)]).to(tokens.device)
        queries_in = self._branches(tokens[:, read], selection[:, read], types[read], with_negative)  # [br·B, 1+L, w]
        branches = 2 if with_negative else 1
        mask = text_mask.repeat(branches, 1)  # [br·B, L]
        attend = torch.cat([torch.ones(mask.shape[0], num_image, dtype=torch.bool, device=mask.device), mask != 0], dim=1)
        fused = self._attend(queries_in, F.linear(queries_in, w_q, b_q), kv, attend[:, None, None, :])  # [br·B, 1+L, w]
        combined = torch.cat([masked_mean(fused[:, 1:], mask), fused[:, 0]], dim=-1)  # c [br·B, 2w]
        dynamic = self.dynamic_scalar(combined)  # λ [br·B, 1]
        residual = self.output_layer(F.relu(self.combiner_layer(combined)))
        text_embed = text_embed.repeat(branches, 1)
        ref_embed = ref_embed.repeat(branches, 1)
        query = OUTPUT_SCALE * residual + dynamic * text_embed + (1 - dynamic) * ref_embed
        return F.normalize(query, dim=-1)  # [br·B, D]

    def compose(
        self,
        ref_tokens: Tensor,
        ref_embed: Tensor,
        text_tokens: Tensor,
        text_embed: Tensor,
        text_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Composed queries ``q⁺`` (prototype + upgradation) and ``q⁻`` (discarded + degradation).

        ref_tokens [B, 1+P, d_img], ref_embed [B, D], text_tokens [B, L, w], text_embed [B, D],
        text_mask [B, L] -> (q⁺ [B, D], q⁻ [B, D]), L2-normalised.
        """
        queries = self._compose(ref_tokens, ref_embed, text_tokens, text_embed, text_mask, with_negative=True)
        q_pos, q_neg = queries.chunk(2)
        return q_pos, q_neg

    def compose_query(
        self,
        ref_tokens: Tensor,
        ref_embed: Tensor,
        text_tokens: Tensor,
        text_embed: Tensor,
        text_mask: Tensor,
    ) -> Tensor:
        """Only ``q⁺`` [B, D], the retrieval query (skips the negative branch)."""
        return self._compose(ref_tokens, ref_embed, text_tokens, text_embed, text_mask, with_negative=False)

    def encode_target(self, tgt_tokens: Tensor, tgt_embed: Tensor) -> Tensor:
        """Target feature ``t = normalize(0.01 · fusion(Ṽ_t + type0)[:, 0] + e_img_t)`` [B, D]."""
        projected = self.image_token_proj_layer(tgt_tokens)
        sequence = projected + self._type_embedding(IMAGE_TOKEN_TYPE, projected)
        read = torch.zeros(1, dtype=torch.long, device=sequence.device)
        fused_class = self._fuse(sequence, read, key_padding_mask=None)[:, 0]  # [B, w]
        return F.normalize(OUTPUT_SCALE * fused_class + tgt_embed, dim=-1)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, lr_ratio: float) -> list[dict[str, Any]]:
        """The official learning-rate groups of the head (docs/ssn.md, training recipe).

        combiner / output / dynamic scalar: lr; fusion layer and selection masks: lr·ratio·4;
        token types: lr·ratio·4; image token projection: lr·ratio·2.
        """
        groups = {
            "head": ([self.combiner_layer, self.output_layer, self.dynamic_scalar], lr),
            "fusion_and_selection": (
                [self.fusion_layer, self.text_token_selection_mask, self.image_token_selection_mask],
                lr * lr_ratio * 4,
            ),
            "token_types": ([self.token_type_embeddings], lr * lr_ratio * 4),
            "token_projection": ([self.image_token_proj_layer], lr * lr_ratio * 2),
        }
        result = []
        for name, (modules, group_lr) in groups.items():
            params = [p for module in modules for p in module.parameters()]
            result.append({"name": name, "params": params, "lr": group_lr})
        assert sum(len(g["params"]) for g in result) == len(list(self.parameters())), "a parameter has no group"
        return result
