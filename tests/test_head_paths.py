"""The computation paths of NoahHead: chunked CPU dropout kernel, SDPA, compile; all against the formula."""
import pytest
import torch
import torch.nn.functional as F

import noah_mlp.head as head_mod
from noah_mlp import NoahHead
from noah_mlp.head import _chunk_plan, bernoulli_drop_positions, class_attention

from test_head import CASES, _randomise, reference_noah


def _qkv(B, N, K, L, D, Dv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, K, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, N, L, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, N, L, Dv, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def _plain_attention(q, k, v, mask=None):
    """Materialised reference: softmax(q k^T) (times the mask, scale folded in) @ v."""
    a = torch.einsum('nkd,bnld->bnkl', q, k).softmax(-1)
    if mask is not None:
        a = a * mask
    return a @ v


@pytest.mark.parametrize('chunk_elements', [1, 40, 200, 10 ** 6])
def test_chunked_without_dropout_equals_sdpa_and_formula(chunk_elements):
    q, k, v = _qkv(3, 2, 7, 9, 5, 4)
    out = class_attention(q, k, v, 0., impl='chunked', chunk_elements=chunk_elements)
    ref = _plain_attention(q, k, v)
    sdpa = class_attention(q, k, v, 0., impl='sdpa')
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sdpa, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def _mask_from_positions(positions, B, N, K, L, chunk_elements, scale):
    """Dense (B, N, K, L) mask for drop positions counted chunk after chunk, as the kernel does."""
    mask = torch.full((B, N, K, L), scale, dtype=torch.float64)
    start, pos = 0, set(positions.tolist())
    for b0, b1, k0, k1 in _chunk_plan(B, N, K, L, chunk_elements):
        block = torch.full(((b1 - b0) * N * (k1 - k0) * L,), scale, dtype=torch.float64)
        for i in range(block.numel()):
            if start + i in pos:
                block[i] = 0.
        mask[b0:b1, :, k0:k1] = block.view(b1 - b0, N, k1 - k0, L)
        start += block.numel()
    return mask


@pytest.mark.parametrize('chunk_elements', [1, 30, 200, 10 ** 6])
def test_chunked_dropout_equals_masked_formula_forward_and_backward(monkeypatch, chunk_elements):
    """With the drop positions fixed, output and all gradients equal the materialised masked attention."""
    B, N, K, L, p = 3, 2, 7, 9, 0.3
    g = torch.Generator().manual_seed(5)
    positions = torch.nonzero(torch.rand(B * N * K * L, generator=g) < p).flatten()
    monkeypatch.setattr(head_mod, 'bernoulli_drop_positions', lambda numel, p, device=None: positions.clone())
    q, k, v = _qkv(B, N, K, L, 5, 4)
    out = class_attention(q, k, v, p, impl='chunked', chunk_elements=chunk_elements)
    mask = _mask_from_positions(positions, B, N, K, L, chunk_elements, 1. / (1. - p))
    ref = _plain_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def _attention_form_mask(monkeypatch, B, N, K, L, p):
    """Fixes the chunked kernel's drop positions; returns the (B, N, K, L) mask they make, scale folded in."""
    g = torch.Generator().manual_seed(N * K + L)
    positions = torch.nonzero(torch.rand(B * N * K * L, generator=g) < p).flatten()
    monkeypatch.setattr(head_mod, 'bernoulli_drop_positions', lambda numel, p, device=None: positions.clone())
    return _mask_from_positions(positions, B, N, K, L, head_mod.DEFAULT_CHUNK_ELEMENTS, 1. / (1. - p))


def _direct_form_mask(monkeypatch, B, N, K, L, p):
    """The direct form drops its (N, B*L, K) values with F.dropout: the same seed draws the same mask on ones."""
    torch.manual_seed(5)
    mask = F.dropout(torch.ones(N, B * L, K, dtype=torch.float64), p, True)
    torch.manual_seed(5)
    return mask.view(N, B, L, K).permute(1, 0, 3, 2)  # (B, N, K, L)


@pytest.mark.parametrize('form', ['attention', 'direct'])
@pytest.mark.parametrize('C,N,r,K,L,kv_split,head_split', CASES[:4] + CASES[-3:])
def test_head_dropout_equals_formula_with_the_same_mask(monkeypatch, form, C, N, r, K, L, kv_split, head_split):
    """The whole head in training mode, in each form: the NOAH formula with dropout on v[b,n,k,l],
    forward and gradients, under the mask that form draws."""
    B, p = 3, 0.25
    monkeypatch.setattr(head_mod, 'direct_form_applies', lambda key, value: form == 'direct')
    torch.manual_seed(0)
    head = _randomise(NoahHead(C, K, num_heads=N, key_ratio=r, drop=p, kv_split=kv_split,
                               head_split=head_split).double()).train()
    x = torch.randn(B, L, C, dtype=torch.float64, requires_grad=True)
    mask = (_direct_form_mask if form == 'direct' else _attention_form_mask)(monkeypatch, B, N, K, L, p)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    out = head(x)
    expected = reference_noah(head, x, value_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    params = [x] + list(head.parameters())
    go = torch.randn_like(out)
    for g1, g2 in zip(torch.autograd.grad(out, params, go), torch.autograd.grad(expected, params, go)):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('L,C,r,expected', [
    (49, 2048, 1 / 8, 'direct'),      # ResNet-50: 49 tokens, 448 value channels per group
    (49, 512, 1 / 8, 'direct'),       # ResNet-18: 112 per group
    (196, 384, 1 / 2, 'attention'),   # DeiT-S: 48 per group
    (196, 512, 1 / 2, 'attention'),   # Mixer-S/16: 64 per group
    (64, 512, 1 / 2, 'attention'),    # as many tokens as value channels
])
def test_auto_form_follows_tokens_against_value_channels(monkeypatch, L, C, r, expected):
    """'auto' picks the direct form exactly when tokens are fewer than value channels per group,
    and the two forms agree there."""
    picked = []
    for name in ('_direct_logits', '_attention_logits'):
        real = getattr(head_mod, name)
        monkeypatch.setattr(head_mod, name, lambda *a, _real=real, _name=name: picked.append(_name) or _real(*a))
    head = NoahHead(C, 10, num_heads=4, key_ratio=r).eval()
    x = torch.randn(2, L, C)
    with torch.no_grad():
        out = head(x)
    assert picked == ['_' + expected + '_logits']
    xk, xv = head._split_tokens(x)
    wq, _ = head.class_queries()
    wv, bv = head.class_values()
    other = 'attention' if expected == 'direct' else 'direct'
    torch.testing.assert_close(out, head_mod.noah_logits(xk, xv, wq, wv, bv, form=other), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='form'):
        head_mod.noah_logits(xk, xv, wq, wv, bv, form='grouped')
    # reduced precision keeps the fused kernel, which holds the scores in fp32
    picked.clear()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        head(x)
    head.bfloat16()(x.bfloat16())
    assert picked == ['_attention_logits', '_attention_logits']


def test_chunked_dropout_gradcheck_and_reproducible_with_seed():
    """Backward uses the forward's mask (gradcheck reseeds per call); a fixed seed gives identical results."""
    q, k, v = _qkv(2, 2, 5, 6, 3, 4)

    def f(q, k, v):
        torch.manual_seed(123)
        return class_attention(q, k, v, 0.4, impl='chunked', chunk_elements=25)

    assert torch.autograd.gradcheck(f, (q, k, v))
    a, b = f(q, k, v), f(q, k, v)
    assert torch.equal(a, b)
    torch.manual_seed(124)
    assert not torch.equal(a, class_attention(q, k, v, 0.4, impl='chunked', chunk_elements=25))


def test_drop_positions_are_an_independent_bernoulli_mask():
    torch.manual_seed(0)
    n, p, draws = 64, 0.3, 20000
    masks = torch.zeros(draws, n)
    for i in range(draws):
        pos = bernoulli_drop_positions(n, p)
        assert torch.all(pos[1:] > pos[:-1]) and (pos.numel() == 0 or (0 <= pos[0] and pos[-1] < n))
        masks[i, pos] = 1.
    freq = masks.mean(0)
    tol = 5 * (p * (1 - p) / draws) ** 0.5
    assert torch.all((freq - p).abs() < tol), 'each position drops with probability p'
    pair = (masks[:, :-1] * masks[:, 1:]).mean(0)  # neighbours, the pairs a gap sampler could couple
    assert torch.all((pair - p * p).abs() < 5 * (p * p * (1 - p * p) / draws) ** 0.5), 'drops are independent'
    far = (masks[:, 0] * masks[:, -1]).mean()
    assert abs(far - p * p) < 5 * (p * p * (1 - p * p) / draws) ** 0.5
    torch.manual_seed(1)
    expected = bernoulli_drop_positions(500, 0.2)
    torch.manual_seed(1)
    with pytest.MonkeyPatch.context() as mp:  # rounds of 3 draws: the top-up loop runs many times
        mp.setattr(head_mod, '_gap_draws', lambda numel, p: 3)
        topped_up = bernoulli_drop_positions(500, 0.2)
    assert torch.equal(topped_up, expected)
    big = bernoulli_drop_positions(10 ** 6, 0.1)
    assert abs(big.numel() - 10 ** 5) < 5 * (10 ** 6 * 0.09) ** 0.5
    assert bernoulli_drop_positions(100, 0.).numel() == 0


def test_auto_picks_chunked_for_cpu_dropout_and_sdpa_otherwise(monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(head_mod.F, 'scaled_dot_product_attention',
                        lambda *a, **kw: calls.append(kw.get('dropout_p')) or real_sdpa(*a, **kw))
    head = NoahHead(16, 5, num_heads=2, drop=0.2)
    x = torch.randn(2, 8, 16)
    head.train()(x)
    assert calls == [], 'CPU training with dropout should not materialise through SDPA'
    head.eval()(x)
    assert calls == [0.]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        head.train()(x)
    assert calls == [0., 0.2], 'autocast keeps SDPA'
    out = torch.func.vmap(lambda t: head(t.unsqueeze(0)).squeeze(0), randomness='different')(x)
    assert out.shape == (2, 5) and calls == [0., 0.2, 0.2], 'torch.func transforms keep SDPA'


def test_chunked_path_saves_no_attention_sized_tensor():
    """Autograd keeps the inputs, the (B, N, K, Dv) output and ~numel*p int32 drop positions."""
    B, N, K, L, D = 4, 4, 100, 49, 9
    q, k, v = _qkv(B, N, K, L, D, D, dtype=torch.float32)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        class_attention(q, k, v, 0.1, impl='chunked')
    numel = B * N * K * L
    extra = sum(saved.values()) - sum(t.untyped_storage().nbytes() for t in (q, k, v))
    budget = B * N * K * D * 4 + 1.2 * numel * 0.1 * 4  # output, int32 drop positions
    assert extra < budget, (extra, budget)
    assert budget < numel * 4 / 3  # a third of one fp32 copy of the attention


def test_compile_fullgraph_trains_with_dropout():
    """torch.compile(fullgraph=True) traces the head (SDPA path) in training mode with dropout."""
    torch._dynamo.reset()
    head = NoahHead(16, 5, num_heads=2, drop=0.2).train()
    compiled = torch.compile(head, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 8, 16, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    assert out.shape == (2, 5) and x.grad is not None
    head.eval()
    torch.testing.assert_close(compiled(x), head(x))


@pytest.mark.parametrize('multiple', [1, 8])
def test_sdpa_path_padding_is_exact_and_its_dropout_unbiased(multiple):
    """The SDPA path (CUDA's, with its padding to multiples of 8, run here on CPU) against the formula."""
    q, k, v = _qkv(2, 2, 5, 7, 3, 4)
    out = class_attention(q, k, v, 0., impl='sdpa', head_dim_multiple=multiple)
    ref = _plain_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([class_attention(q, k, v, 0.3, impl='sdpa', head_dim_multiple=multiple)
                             for _ in range(3000)])
    assert draws.shape[-1] == 4
    std_err = draws.std(0) / 3000 ** 0.5
    assert torch.all((draws.mean(0) - ref).abs() < 5 * std_err + 1e-9)


def test_chunked_dropout_mean_and_variance_match_independent_masks():
    """Same statistics as SDPA's dropout: unbiased, and Var = p/(1-p) sum_l (a v)^2 per output."""
    q, k, v = _qkv(2, 2, 5, 7, 3, 1)
    p, n = 0.3, 6000
    torch.manual_seed(0)
    with torch.no_grad():
        a = torch.einsum('nkd,bnld->bnkl', q, k).softmax(-1)
        mean = a @ v
        var = p / (1 - p) * (a.square() @ v.square())
        draws = torch.stack([class_attention(q, k, v, p, impl='chunked', chunk_elements=33) for _ in range(n)])
    assert torch.all((draws.mean(0) - mean).abs() < 5 * (var / n).sqrt() + 1e-9)
    torch.testing.assert_close(draws.var(0), var, rtol=0.12, atol=1e-9)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('training', [False, True])
def test_autocast_dtype_and_no_softmax_overflow(dtype, training):
    """Under autocast the logits come out in the autocast dtype (as a Linear head's do), finite even
    for scores far beyond fp16's exp range, and so do the gradients."""
    torch.manual_seed(0)
    head = NoahHead(32, 10, num_heads=4, drop=0.1).train(training)
    linear = torch.nn.Linear(32, 10)
    x = (torch.randn(2, 16, 32) * 30).requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        out = head(x)
        expected_dtype = linear(x.mean(1)).dtype
    assert out.dtype == expected_dtype == dtype
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_compile_fullgraph_tiny_model_train_with_dropout_and_eval():
    import timm
    import noah_mlp  # noqa: F401  (registers the models)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('noah_gmlp_ti16_224', img_size=32, patch_size=8, num_blocks=1, num_classes=7)
    assert model.head.drop == 0.1
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = torch.randn(3, 3, 32, 32)
    model.train()
    compiled(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
