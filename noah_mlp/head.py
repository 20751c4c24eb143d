"""NOAH: Non-glObal Attentive Head.

Li, Zhou, Yao, "NOAH: Learning Pairwise Object Category Attentions for Image Classification", 2024.

The head replaces "global average pool + linear". For every group n and class k it scores each
token with a key projection, softmaxes the scores over the tokens and sums a value projection of
the tokens under that attention; the logits add the N groups.

Parameters are stored as upstream's two (grouped) 1x1 convolutions, so published checkpoints load
with strict=True (`query.weight` (N*K, Ck/N, 1, 1), `query.bias` (N*K,), same for `value`;
output channel n*K + k is group n, class k). The computation never runs those convolutions;
`noah_logits` picks one of two exact forms by shape (docs/head.md, "The computation paths"):

* the direct form, with fewer tokens than value channels per group, in fp32 / fp64 (ResNet's 7x7
  maps): batched per-group matrix products give every class's scores and values, as published;
* the attention form otherwise: the attention identity (see `_attention_logits`) turns each group
  into class attention over the value tokens, run as
  - no dropout (inference, or training with drop=0), any device, compile, ONNX export:
    `F.scaled_dot_product_attention`, a fused kernel that never materialises (B, N, K, L);
  - dropout on CUDA, or under compile / autocast / tracing: the same SDPA call with dropout_p
    (CUDA's flash / efficient kernels take it);
  - dropout in eager CPU fp32/fp64, where SDPA would fall back to its materialising math backend:
    `_ChunkedDropoutAttention`, cache-sized chunks, drop positions drawn as geometric gaps
    (numel * p random numbers instead of numel) and kept sparse for the backward.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['NoahHead', 'noah_split_sizes', 'noah_logits', 'class_attention']

# Elements of the (samples, N, classes, L) attention one chunk of the CPU dropout path holds: 2 MiB
# in fp32, so a chunk and its gradient stay about within a 2-core L2 (measured: 2^18..2^20 alike).
DEFAULT_CHUNK_ELEMENTS = 1 << 19


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


def _gap_draws(numel: int, p: float) -> int:
    """Geometric draws per round: the expected number of drops plus 8 standard deviations."""
    mean = numel * p
    return int(mean + 8. * math.sqrt(mean * (1. - p)) + 16)


def bernoulli_drop_positions(numel: int, p: float, device=None) -> torch.Tensor:
    """Sorted positions in [0, numel) where an i.i.d. Bernoulli(p) process says "drop".

    The gaps between successive drops of a Bernoulli(p) sequence are i.i.d. geometric(p) (support
    1, 2, ...), so the drop positions are the running sums of geometric draws, minus one. That
    needs about numel * p random numbers instead of numel, and yields exactly the distribution of
    an independent mask per element. Draws come from PyTorch's generator (`torch.manual_seed`).
    """
    if numel <= 0 or p <= 0.:
        return torch.zeros(0, dtype=torch.int64, device=device)
    draws = _gap_draws(numel, p)
    # gaps are >= 1; the clamp only guards the one-in-2^53 uniform draw of 0 (an infinite gap)
    ends = torch.empty(draws, dtype=torch.int64, device=device).geometric_(p).clamp_(1, numel).cumsum_(0)
    while int(ends[-1]) < numel:  # the running sum must pass numel (a second round is very rare)
        more = torch.empty(draws, dtype=torch.int64, device=device).geometric_(p).clamp_(1, numel).cumsum_(0)
        ends = torch.cat([ends, more.add_(ends[-1])])
    count = int(torch.searchsorted(ends, numel, right=True))
    return ends[:count].sub_(1)


def _chunk_plan(B: int, N: int, K: int, L: int, chunk_elements: int) -> List[Tuple[int, int, int, int]]:
    """(b0, b1, k0, k1) blocks covering (B, N, K, L) with about `chunk_elements` elements each."""
    per_sample = N * K * L
    if per_sample <= chunk_elements:
        step = max(1, chunk_elements // per_sample)
        return [(b, min(B, b + step), 0, K) for b in range(0, B, step)]
    pieces = -(-per_sample // chunk_elements)
    step = -(-K // pieces)
    return [(b, b + 1, k, min(K, k + step)) for b in range(B) for k in range(0, K, step)]


def _bmm_or_matmul(a: torch.Tensor, b: torch.Tensor, one_sample: bool) -> torch.Tensor:
    return torch.bmm(a, b) if one_sample else torch.matmul(a, b)


class _ChunkedDropoutAttention(torch.autograd.Function):
    """softmax(q k^T) with dropout on the weights, times v; chunked, with a sparse saved mask.

    q (N, K, D) is shared by the batch, k (B, N, L, D), v (B, N, L, Dv), scale 1; returns (B, N, K, Dv).
    The (B, N, K, L) attention is only ever held one cache-sized chunk at a time. Autograd keeps
    the inputs, the output and the positions of the dropped weights (about numel * p integers);
    the backward recomputes each chunk's softmax, as flash attention does, and zeroes the same
    positions again.
    """

    @staticmethod
    def forward(ctx, q, k, v, p: float, chunk_elements: int):
        B, N, L, _ = k.shape
        K, Dv = q.shape[1], v.shape[-1]
        chunks = _chunk_plan(B, N, K, L, chunk_elements)
        sizes = [(b1 - b0) * N * (k1 - k0) * L for b0, b1, k0, k1 in chunks]
        # Positions count the elements chunk after chunk: a relabelling of (b, n, k, l), so the
        # mask is still one independent draw per element.
        drops = bernoulli_drop_positions(sum(sizes), p, q.device)
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        bounds = torch.searchsorted(drops, torch.tensor(starts, device=drops.device)).tolist()
        # the backward keeps the positions inside each chunk, which fit int32
        local = torch.empty(drops.shape, dtype=torch.int32, device=drops.device)
        out = q.new_empty(B, N, K, Dv)
        k_t = k.transpose(-1, -2)
        for i, (b0, b1, k0, k1) in enumerate(chunks):
            one = b1 - b0 == 1
            bs = b0 if one else slice(b0, b1)
            dropped = drops[bounds[i]:bounds[i + 1]].sub_(starts[i])
            local[bounds[i]:bounds[i + 1]] = dropped
            attn = torch.softmax(_bmm_or_matmul(q[:, k0:k1], k_t[bs], one), dim=-1)
            attn.view(-1).index_fill_(0, dropped, 0.)
            if k1 - k0 == K:
                torch.matmul(attn, v[bs], out=out[bs])
            else:
                out[bs, :, k0:k1] = _bmm_or_matmul(attn, v[bs], one)
        out.mul_(1. / (1. - p))
        ctx.save_for_backward(q, k, v, out, local)
        ctx.plan = (chunks, bounds, p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, drops = ctx.saved_tensors
        chunks, bounds, p = ctx.plan
        # sum_l w[l] dw[l] over the kept, scaled weights w of a row equals grad_out . out
        row_dot = (grad_out * out).sum(-1, keepdim=True)
        grad_out = grad_out * (1. / (1. - p))
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        k_t, v_t = k.transpose(-1, -2), v.transpose(-1, -2)
        for i, (b0, b1, k0, k1) in enumerate(chunks):
            one = b1 - b0 == 1
            bs = b0 if one else slice(b0, b1)
            dropped = drops[bounds[i]:bounds[i + 1]].long()
            q_c, g_c = q[:, k0:k1], grad_out[bs, :, k0:k1]
            attn = torch.softmax(_bmm_or_matmul(q_c, k_t[bs], one), dim=-1)  # recomputed
            grad_s = _bmm_or_matmul(g_c, v_t[bs], one)  # d loss / d kept weights, before the mask
            grad_s.view(-1).index_fill_(0, dropped, 0.)
            grad_s.sub_(row_dot[bs, :, k0:k1]).mul_(attn)  # through the softmax: d loss / d scores
            attn.view(-1).index_fill_(0, dropped, 0.)
            if one:
                grad_v[b0].baddbmm_(attn.transpose(-1, -2), g_c)
                grad_k[b0].baddbmm_(grad_s.transpose(-1, -2), q_c)
                grad_q[:, k0:k1].baddbmm_(grad_s, k[b0])
            else:
                grad_v[bs] += torch.matmul(attn.transpose(-1, -2), g_c)
                grad_k[bs] += torch.matmul(grad_s.transpose(-1, -2), q_c)
                grad_q[:, k0:k1] += torch.matmul(grad_s, k[bs]).sum(0)
        return grad_q, grad_k, grad_v, None, None


@torch.jit.unused
def _chunked_path_applies(x: torch.Tensor) -> bool:
    """Eager CPU fp32/fp64 without autocast; compile, export, tracing and torch.func keep plain SDPA."""
    return (x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled('cpu')
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export() and not torch._C._are_functorch_transforms_active())


@torch.jit.unused
def _chunked_class_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float, chunk_elements: int,
) -> torch.Tensor:
    # an autograd.Function: eager only, so TorchScript compiles this call as unused
    return _ChunkedDropoutAttention.apply(
        query, key.contiguous(), value.contiguous(), max(float(dropout_p), 0.), int(chunk_elements))


def _sdpa_class_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float, head_dim_multiple: int,
) -> torch.Tensor:
    d, dv = query.shape[-1], value.shape[-1]
    head_dim = -(-max(d, dv) // head_dim_multiple) * head_dim_multiple
    if head_dim > d:  # F.pad copies even when it adds nothing
        query, key = F.pad(query, (0, head_dim - d)), F.pad(key, (0, head_dim - d))
    if head_dim > dv:
        value = F.pad(value, (0, head_dim - dv))
    query = query.unsqueeze(0).expand(key.shape[0], -1, -1, -1)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=1.0)
    return out[..., :dv]


def class_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        dropout_p: float = 0.,
        impl: str = 'auto',
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        head_dim_multiple: Optional[int] = None,
) -> torch.Tensor:
    """softmax(query key^T) value with scale 1, per group, for class queries shared by the batch.

    query (N, K, D), key (B, N, L, D), value (B, N, L, Dv) -> (B, N, K, Dv); dropout with rate
    `dropout_p` on the attention weights (one independent mask per (b, n, k, l), scaled 1/(1-p)).

    impl='sdpa' runs `F.scaled_dot_product_attention` (fused flash kernel on CPU without dropout,
    flash / efficient kernels with dropout on CUDA): query/key and value head sizes are zero-padded
    to one size, rounded up to `head_dim_multiple` (default 8 on CUDA, where the fused kernels
    want it, 1 elsewhere); zero columns change no score and no output. impl='chunked' runs the
    chunked CPU kernel above. 'auto' takes 'chunked' for dropout in eager CPU fp32/fp64 (where
    SDPA would fall back to its materialising math backend), 'sdpa' otherwise.

    TorchScript compiles this function with the SDPA path only; FX records it as one call
    (`torch.fx.wrap` below), so a traced model picks its path when it runs, as eager does.
    """
    if impl == 'auto':
        use_chunked = dropout_p > 0. and not torch.jit.is_scripting() and _chunked_path_applies(key)
        impl = 'chunked' if use_chunked else 'sdpa'
    if impl == 'chunked':
        return _chunked_class_attention(query, key, value, dropout_p, chunk_elements)
    if impl != 'sdpa':
        raise ValueError("impl must be 'auto', 'sdpa' or 'chunked', got '" + impl + "'.")
    if head_dim_multiple is None:
        multiple = 8 if key.is_cuda else 1
    else:
        multiple = head_dim_multiple
    return _sdpa_class_attention(query, key, value, dropout_p, multiple)


# The device / dtype / autocast checks above cannot run on FX proxies: trace the call as a leaf.
torch.fx.wrap('class_attention')


def _direct_logits(
        key: torch.Tensor, value: torch.Tensor, wq: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor,
        dropout_p: float,
) -> torch.Tensor:
    """The published form, per group: scores and values of every (class, token), (N, B*L, K) each."""
    B, N, L, _ = key.shape
    dtype = key.dtype
    # one batched product per group over all images' tokens; the class weights are never broadcast over B
    scores = torch.bmm(key.transpose(0, 1).reshape(N, B * L, -1), wq.to(dtype).transpose(1, 2))
    values = torch.baddbmm(bv.to(dtype).unsqueeze(1), value.transpose(0, 1).reshape(N, B * L, -1),
                           wv.to(dtype).transpose(1, 2))
    if dropout_p > 0.:
        values = F.dropout(values, dropout_p, True)
    attn = torch.softmax(scores.view(N, B, L, -1), dim=2)
    return (attn * values.view(N, B, L, -1)).sum(dim=(0, 2))


def _attention_logits(
        key: torch.Tensor, value: torch.Tensor, wq: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor,
        dropout_p: float,
) -> torch.Tensor:
    """The attention identity (docs/head.md): class attention over the value tokens, then Wv."""
    # Each softmax row sums to one and v is linear in the value tokens, so
    #   sum_l a[b,n,k,l] * v[b,n,k,l] = Wv[n,k] . (sum_l a[b,n,k,l] value[b,n,l]) + bv[n,k]:
    # attention with the K class vectors Wq[n] as queries and scale 1, which a fused kernel computes
    # without ever holding a[b,n,k,l]. Dropout on v[b,n,k,l] is the same random operation as
    # dropout on a[b,n,k,l].
    dtype = key.dtype
    if dropout_p > 0.:
        # kept weights no longer sum to one: a column of ones carries bv through the attention
        value = F.pad(value, (0, 1), value=1.)  # (B, N, L, dv + 1)
        wv = torch.cat([wv, bv.unsqueeze(-1)], dim=-1)  # (N, K, dv + 1)
    z = class_attention(wq.to(dtype), key, value, dropout_p=dropout_p)  # (B, N, K, dv [+ 1])
    # A broadcast product keeps z itself for backward (the attention keeps it anyway); an
    # einsum would run bmm on a permuted copy of z and keep that copy too.
    out = (z * wv.to(z.dtype)).sum(dim=(1, 3))
    if dropout_p == 0.:
        out = out + bv.sum(0).to(out.dtype)
    return out


@torch.jit.unused
def _autocast_enabled(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def direct_form_applies(key: torch.Tensor, value: torch.Tensor) -> bool:
    """Fewer tokens than value channels per group, in full precision.

    With few tokens the (B, N, K, L) scores and values are smaller than the attention identity's
    (B, N, K, dv) output (ResNet's 7x7 maps at r=1/8). In fp16 / bf16 (or under autocast) the
    fused kernel keeps the scores in fp32, where the direct form would round them to the low
    precision before the softmax, so reduced precision keeps the attention form.
    """
    if key.shape[2] >= value.shape[-1]:
        return False
    if key.dtype != torch.float32 and key.dtype != torch.float64:
        return False
    return torch.jit.is_scripting() or not _autocast_enabled(key)


def noah_logits(
        key: torch.Tensor,
        value: torch.Tensor,
        wq: torch.Tensor,
        wv: torch.Tensor,
        bv: torch.Tensor,
        dropout_p: float = 0.,
        form: str = 'auto',
) -> torch.Tensor:
    """Logits sum_{n,l} softmax_l(Wq[n,k] . key[b,n,l]) * drop(Wv[n,k] . value[b,n,l] + bv[n,k]), (B, K).

    key (B, N, L, dk) and value (B, N, L, dv) are each group's token slices, wq (N, K, dk),
    wv (N, K, dv), bv (N, K); the query bias is left out (it cannot change a softmax). Two exact forms:

    * 'attention': the attention identity, `class_attention` then the value weights; never holds
      anything of size (B, N, K, L) (fused kernels). Best when tokens outnumber value channels
      (ViTs, Mixers: 196 tokens of 24..96 value channels per group).
    * 'direct': the published computation with batched matrix products per group; holds the
      (B, N, K, L) scores and values. Best with few tokens and wide groups (ResNet-50: 49 tokens,
      448 value channels per group; 4-7x faster there than the padded fused kernel on CPU).

    'auto' takes 'direct' where `direct_form_applies`, else 'attention'. Both forms drop
    v[b, n, k, l] with one independent mask per element, scaled 1/(1-p).
    """
    if form == 'auto':
        form = 'direct' if direct_form_applies(key, value) else 'attention'
    if form == 'direct':
        return _direct_logits(key, value, wq, wv, bv, dropout_p)
    if form != 'attention':
        raise ValueError("form must be 'auto', 'attention' or 'direct', got '" + form + "'.")
    return _attention_logits(key, value, wq, wv, bv, dropout_p)


# The form depends on the token count, which FX proxies do not have: trace the call as a leaf.
torch.fx.wrap('noah_logits')


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
        bias = self.query.bias
        assert bias is not None  # built with bias=True; TorchScript needs the Optional refined
        return self.query.weight.reshape(N, K, -1), bias.reshape(N, K)

    def class_values(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Value weights (N, K, dv) and biases (N, K)."""
        N, K = self.num_heads, self.num_classes
        bias = self.value.bias
        assert bias is not None
        return self.value.weight.reshape(N, K, -1), bias.reshape(N, K)

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores q[b, n, k, l] before the softmax over tokens, (B, N, K, L). Materialises them: for inspection."""
        xk, _ = self._split_tokens(x)
        wq, bq = self.class_queries()
        return torch.einsum('bnld,nkd->bnkl', xk, wq.to(xk.dtype)) + bq.to(xk.dtype)[None, :, :, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk, xv = self._split_tokens(x)
        wq, bq = self.class_queries()
        wv, bv = self.class_values()
        drop = self.drop if self.training else 0.
        out = noah_logits(xk, xv, wq, wv, bv, dropout_p=drop)
        # bq adds the same constant to every score of a softmax row, so it cannot change the output;
        # it takes part in the graph with gradient 0, its true gradient: DDP needs every parameter used.
        return out + bq.sum().to(out.dtype) * 0.

    @torch.no_grad()
    def init_scaled(self, scale: Optional[float] = None, bias: Optional[float] = None) -> None:
        """timm's ``--head-init-scale`` / ``--head-init-bias`` for a NOAH head (docs/head.md).

        `scale` multiplies the value projection, so every logit is multiplied by exactly `scale` (the
        attention maps stay as they are); `bias` sets each group's value bias to bias / N: a softmax
        row sums to one, so the N groups add exactly `bias` to every logit.
        """
        if scale is not None:
            self.value.weight.mul_(scale)
            self.value.bias.mul_(scale)
        if bias is not None:
            self.value.bias.fill_(bias / self.num_heads)
