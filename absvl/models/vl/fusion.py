"""METER co-attention fusion encoder (Dou et al. CVPR 2022; SPEC §5).

Each stream is mapped to the fusion width H and tagged with a token-type embedding (0 text,
1 image). Every layer runs, in each stream, self-attention → cross-attention (queries from its
own stream, keys/values from the other) → FFN, and both streams are updated in parallel from the
previous layer's outputs. Sub-layers are post-norm as in METER's ``BertCrossLayer``:
``x = LN(x + Dropout(Sublayer(x)))``. Attention is fused (``scaled_dot_product_attention``);
text padding is masked out wherever text tokens are keys, image tokens are all valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import nn

TEXT_TYPE, IMAGE_TYPE = 0, 1


class FusionAttention(nn.Module):
    """Post-norm multi-head attention of ``x`` over ``context`` (self-attention when they are the same)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1, norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask``: ``[B, N_context]``, true (or 1) for tokens that may be attended to."""
        B, N, C = x.shape
        heads, head_dim = self.num_heads, C // self.num_heads
        q = self.q(x).view(B, N, heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return self.norm(x + self.proj_drop(out))


class FeedForward(nn.Module):
    """Post-norm FFN: ``LN(x + Dropout(W2·GELU(W1·x)))``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1, norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class CoAttentionLayer(nn.Module):
    """One stream's layer: self-attention → cross-attention to the other stream → FFN."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1, norm_eps: float = 1e-12):
        super().__init__()
        self.self_attn = FusionAttention(dim, num_heads, dropout, norm_eps)
        self.cross_attn = FusionAttention(dim, num_heads, dropout, norm_eps)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio), dropout, norm_eps)

    def forward(
        self, x: torch.Tensor, other: torch.Tensor, x_mask: torch.Tensor | None, other_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.self_attn(x, x, x_mask)
        x = self.cross_attn(x, other, other_mask)
        return self.ffn(x)


class Pooler(nn.Module):
    """``tanh(W·token_0 + b)`` (METER/BERT pooler), or of the mean of the tokens after the first
    ``mean_after`` ones (an image stream whose backbone pools by the mean of its spatial tokens)."""

    def __init__(self, dim: int, mean_after: int | None = None) -> None:
        super().__init__()
        self.mean_after = mean_after
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0] if self.mean_after is None else x[:, self.mean_after :].mean(dim=1)))


class FusionEncoder(nn.Module):
    """Two-stream co-attention encoder; returns both streams' tokens and the ``[B, 2H]`` pooled pair."""

    def __init__(
        self,
        text_width: int,
        vision_width: int,
        hidden_size: int = 768,
        num_layers: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        norm_eps: float = 1e-12,
        image_mean_after: int | None = None,
        image_positions: bool = False,
    ) -> None:
        """``image_mean_after``: pool the image stream by the mean of its tokens after the first
        ``image_mean_after`` (the backbone's prefix tokens) instead of token 0: for backbones without a
        [cls] token or whose pooled output is the mean of the spatial tokens (their [cls] is untrained).
        ``image_positions``: add fixed 2-D sine-cosine position embeddings (MAE's, timm's
        ``build_sincos2d_pos_embed``) of the patch grid to the spatial image tokens, as ViLT adds position
        embeddings to the patches it reads: for a backbone whose tokens do not keep where they are (a ViT
        pretrained on per-patch labels needs no position, and its tokens lose it)."""
        super().__init__()
        self.text_proj = nn.Linear(text_width, hidden_size)
        self.image_proj = nn.Linear(vision_width, hidden_size)
        self.image_positions = image_positions
        self.token_type_embeddings = nn.Embedding(2, hidden_size)
        self.text_layers = nn.ModuleList(
            CoAttentionLayer(hidden_size, num_heads, mlp_ratio, dropout, norm_eps) for _ in range(num_layers)
        )
        self.image_layers = nn.ModuleList(
            CoAttentionLayer(hidden_size, num_heads, mlp_ratio, dropout, norm_eps) for _ in range(num_layers)
        )
        self.text_pooler = Pooler(hidden_size)
        self.image_pooler = Pooler(hidden_size, mean_after=image_mean_after)

    def forward(
        self,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        image: torch.Tensor,
        grid_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            text: ``[B, T, text_width]`` text encoder states; ``attention_mask``: ``[B, T]``.
            image: ``[B, N, vision_width]`` vision tokens, the spatial ones last, row by row.
            grid_size: ``(h, w)`` of the spatial tokens; needed with ``image_positions``.

        Returns:
            (text tokens ``[B, T, H]``, image tokens ``[B, N, H]``, pooled ``[B, 2H]`` = [text; image]).
        """
        types = self.token_type_embeddings.weight
        x = self.text_proj(text) + types[TEXT_TYPE]
        y = self.image_proj(image) + types[IMAGE_TYPE]
        if self.image_positions:
            if grid_size is None:
                raise ValueError("image_positions needs the grid_size of the image tokens")
            h, w = grid_size
            positions = build_sincos2d_pos_embed([h, w], y.shape[-1], device=y.device, dtype=y.dtype)
            y = torch.cat([y[:, : y.shape[1] - h * w], y[:, y.shape[1] - h * w :] + positions], dim=1)
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            x, y = text_layer(x, y, attention_mask, None), image_layer(y, x, None, attention_mask)
        return x, y, torch.cat([self.text_pooler(x), self.image_pooler(y)], dim=-1)
