"""NOAH: Non-glObal Attentive Head.

Li, Zhou, Yao, "NOAH: Learning Pairwise Object Category Attentions for Image Classification", 2024.

The head replaces "global average pool + linear". For every group n and class k it scores each
token with a key projection, softmaxes the scores over the tokens and sums a value projection of
the tokens under that attention; the logits add the N groups.

Parameters are stored as upstream's two (grouped) 1x1 convolutions, so published checkpoints load
with strict=True (`query.weight` (N*K, Ck/N, 1, 1), `query.bias` (N*K,), same for `value`;
output channel n*K + k is group n, class k). The computation never runs those convolutions: it
goes through the attention identity below, which is exact and far cheaper.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['NoahHead', 'noah_split_sizes']


def noah_split_sizes(
        in_features: int,
        num_heads: int,
        key_ratio: float,
        kv_split: bool = True,
        head_split: bool = True,
) -> Tuple[int, int]:
    """Return (key channels, value channels) of a NOAH head, refusing settings that do not fit."""
    if num_heads < 1:
        raise ValueError(f'NOAH needs at least one head (group), got noah_head_num={num_heads}.')
    if in_features < 1:
        raise ValueError(f'NOAH needs at least one input channel, got {in_features}.')
    if not kv_split:
        key_chs = value_chs = in_features
    else:
        if not 0. < key_ratio < 1.:
            raise ValueError(f'key_ratio must lie in (0, 1) when kv_split=True, got {key_ratio}.')
        key_chs = int(in_features * key_ratio)
        value_chs = in_features - key_chs
        if key_chs < 1 or value_chs < 1:
            raise ValueError(
                f'key_ratio={key_ratio} splits {in_features} channels into {key_chs} key and '
                f'{value_chs} value channels; both must be at least 1.')
    if head_split and (key_chs % num_heads or value_chs % num_heads):
        raise ValueError(
            f'NOAH with noah_head_num={num_heads} splits {in_features} channels (key_ratio={key_ratio}) into '
            f'{key_chs} key and {value_chs} value channels; both must be divisible by {num_heads}.')
    return key_chs, value_chs


class NoahHead(nn.Module):
    """NOAH classifier head: token features (B, L, C) -> logits (B, K).

    Args:
        in_features: C, channels of the backbone's final tokens.
        num_classes: K.
        num_heads: N groups (upstream `noah_head_num`), each with its own attention map per class.
        key_ratio: r, fraction of the channels used as keys (the rest are values).
        drop: dropout rate p on the values v[b, n, k, l] (training only).
        kv_split: False uses all C channels as both keys and values.
        head_split: False makes the projections dense (one group) while keeping N attention maps.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            num_heads: int = 4,
            key_ratio: float = 0.5,
            drop: float = 0.1,
            kv_split: bool = True,
            head_split: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'NoahHead needs num_classes >= 1, got {num_classes}.')
        if not 0. <= drop < 1.:
            raise ValueError(f'NOAH value dropout must lie in [0, 1), got {drop}.')
        dd = {'device': device, 'dtype': dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.key_ratio = key_ratio
        self.kv_split = kv_split
        self.head_split = head_split
        self.drop = drop
        self.key_chs, self.value_chs = noah_split_sizes(in_features, num_heads, key_ratio, kv_split, head_split)
        groups = num_heads if head_split else 1
        self.query = nn.Conv2d(self.key_chs, num_heads * num_classes, 1, groups=groups, **dd)
        self.value = nn.Conv2d(self.value_chs, num_heads * num_classes, 1, groups=groups, **dd)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, num_classes={self.num_classes}, num_heads={self.num_heads}, '
                f'key_ratio={self.key_ratio}, drop={self.drop}, kv_split={self.kv_split}, '
                f'head_split={self.head_split}')

    def _split_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, L, C) -> keys (B, N, L, dk), values (B, N, L, dv), one slice of channels per group."""
        B, L, _ = x.shape
        N = self.num_heads
        if self.kv_split:
            xk, xv = x[..., :self.key_chs], x[..., self.key_chs:]
        else:
            xk = xv = x
        if self.head_split:
            xk = xk.reshape(B, L, N, -1).transpose(1, 2)
            xv = xv.reshape(B, L, N, -1).transpose(1, 2)
        else:
            # dense projections: every group sees all channels
            xk = xk.unsqueeze(1).expand(B, N, L, self.key_chs)
            xv = xv.unsqueeze(1).expand(B, N, L, self.value_chs)
        return xk, xv

    def class_queries(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query weights (N, K, dk) and biases (N, K), the K learned class queries of each group."""
        N, K = self.num_heads, self.num_classes
        return self.query.weight.reshape(N, K, -1), self.query.bias.reshape(N, K)

    def class_values(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Value weights (N, K, dv) and biases (N, K)."""
        N, K = self.num_heads, self.num_classes
        return self.value.weight.reshape(N, K, -1), self.value.bias.reshape(N, K)

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores q[b, n, k, l] before the softmax over tokens, (B, N, K, L). Materialises them: for inspection."""
        xk, _ = self._split_tokens(x)
        wq, bq = self.class_queries()
        return torch.einsum('bnld,nkd->bnkl', xk, wq.to(xk.dtype)) + bq.to(xk.dtype)[None, :, :, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The attention identity: since sum_l a[l] = 1 and v is linear in the value tokens,
        #   sum_l a[b,n,k,l] * v[b,n,k,l] = Wv[n,k] . (sum_l a[b,n,k,l] xv[b,l,n]) + bv[n,k] * sum_l a[b,n,k,l],
        # so each group is plain attention with K learned class queries Wq[n], keys xk and values xv,
        # scale 1: SDPA computes it without materialising (B, N, K, L) where a fused kernel runs.
        # Dropout on v[b,n,k,l] is the same random operation as dropout on a[b,n,k,l], which SDPA's
        # dropout_p does. Augmenting Q'=[Wq | bq], K'=[xk | 1], V'=[xv | 1] keeps it exact with
        # dropout (the ones column of V' carries sum_l a) and keeps bq in the graph (softmax ignores it,
        # but DDP needs every parameter to take part). Zero padding gives q/k and v one head size, which
        # the fused kernels need; on CUDA it is rounded up to a multiple of 8.
        B = x.shape[0]
        xk, xv = self._split_tokens(x)
        wq, bq = self.class_queries()
        wv, bv = self.class_values()
        dk, dv = wq.shape[-1], wv.shape[-1]
        head_dim = max(dk, dv) + 1
        if x.is_cuda:
            head_dim = -(-head_dim // 8) * 8
        dtype = xk.dtype
        ones = xk.new_ones(xk.shape[:-1] + (1,))

        query = torch.cat([wq.to(dtype), bq.to(dtype).unsqueeze(-1)], dim=-1)
        query = F.pad(query, (0, head_dim - dk - 1))
        key = F.pad(torch.cat([xk, ones], dim=-1), (0, head_dim - dk - 1))
        value = F.pad(torch.cat([xv, ones], dim=-1), (0, head_dim - dv - 1))
        query = query.unsqueeze(0).expand(B, -1, -1, -1)

        drop = self.drop if self.training else 0.
        z = F.scaled_dot_product_attention(query, key, value, dropout_p=drop, scale=1.0)  # (B, N, K, D)

        value_weight = torch.cat([wv, bv.unsqueeze(-1)], dim=-1)  # (N, K, dv + 1)
        z = z[..., :dv + 1]
        return torch.einsum('bnkd,nkd->bk', z, value_weight.to(z.dtype))
