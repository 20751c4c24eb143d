"""NoahHead against a plain, materialised reference of the NOAH formula."""
import pytest
import torch

import noah_mlp.head as head_mod
from noah_mlp import NoahHead


@pytest.fixture(params=['attention', 'direct'])
def form(request, monkeypatch):
    """Runs a test under each of `noah_logits`' two forms (the attention identity, the direct form)."""
    monkeypatch.setattr(head_mod, 'direct_form_applies', lambda key, value: request.param == 'direct')
    return request.param


def reference_noah(head: NoahHead, x: torch.Tensor, value_mask: torch.Tensor = None) -> torch.Tensor:
    """The formula as written in docs/head.md: per-token projections, softmax over tokens, weighted sum.

    Reads the parameters straight from the conv weights (output channel n*K + k is group n, class k).
    `value_mask`, if given, multiplies v[b, n, k, l] (dropout with its 1/(1-p) scale folded in).
    """
    B, L, C = x.shape
    N, K = head.num_heads, head.num_classes
    if head.kv_split:
        xk, xv = x[..., :head.key_chs], x[..., head.key_chs:]
    else:
        xk, xv = x, x
    wq = head.query.weight.reshape(N, K, -1)
    wv = head.value.weight.reshape(N, K, -1)
    bq = head.query.bias.reshape(N, K)
    bv = head.value.bias.reshape(N, K)
    if head.head_split:
        xk = xk.reshape(B, L, N, -1)
        xv = xv.reshape(B, L, N, -1)
    else:
        xk = xk.unsqueeze(2).expand(B, L, N, xk.shape[-1])
        xv = xv.unsqueeze(2).expand(B, L, N, xv.shape[-1])
    q = torch.einsum('blnd,nkd->bnkl', xk, wq) + bq[None, :, :, None]
    v = torch.einsum('blnd,nkd->bnkl', xv, wv) + bv[None, :, :, None]
    if value_mask is not None:
        v = v * value_mask
    a = q.softmax(dim=-1)
    return (a * v).sum(dim=(1, 3))


def _randomise(head: NoahHead) -> NoahHead:
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    return head


CASES = [
    # (C, N, r, K, L, kv_split, head_split)
    (16, 1, 0.5, 7, 9, True, True),
    (16, 2, 0.5, 5, 12, True, True),
    (32, 4, 0.5, 11, 16, True, True),
    (64, 8, 0.5, 3, 10, True, True),
    (32, 4, 0.25, 9, 7, True, True),
    (64, 4, 0.125, 13, 16, True, True),
    (64, 8, 0.25, 5, 6, True, True),
    (64, 2, 0.125, 1, 5, True, True),
    (24, 4, 0.5, 7, 9, False, True),
    (24, 4, 0.5, 7, 9, True, False),
    (20, 3, 0.3, 5, 4, True, False),
    (24, 4, 0.25, 5, 8, False, False),
]


@pytest.mark.parametrize('C,N,r,K,L,kv_split,head_split', CASES)
def test_forward_and_gradients_match_formula(C, N, r, K, L, kv_split, head_split, form):
    torch.manual_seed(0)
    head = _randomise(NoahHead(C, K, num_heads=N, key_ratio=r, drop=0., kv_split=kv_split,
                               head_split=head_split).double())
    x = torch.randn(3, L, C, dtype=torch.float64, requires_grad=True)
    out = head(x)
    assert out.shape == (3, K)
    expected = reference_noah(head, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(out)
    params = [x] + list(head.parameters())
    grads = torch.autograd.grad(out, params, grad_out)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for name, g, e in zip(['input'] + [n for n, _ in head.named_parameters()], grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=f'gradient of {name} differs')


def test_every_parameter_takes_part_in_autograd(form):
    """DDP refuses parameters without a gradient; query.bias cannot change the output but must be used."""
    head = NoahHead(32, 10, num_heads=4, drop=0.1)
    head.train()
    head(torch.randn(2, 16, 32)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, f'{name} got no gradient'
    assert torch.count_nonzero(head.value.bias.grad) == 10 * 4


def test_parameter_layout_matches_published_checkpoints():
    head = NoahHead(128, 1000, num_heads=4, key_ratio=0.5)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        'query.weight': (4000, 16, 1, 1), 'query.bias': (4000,),
        'value.weight': (4000, 16, 1, 1), 'value.bias': (4000,),
    }
    dense = NoahHead(128, 10, num_heads=4, key_ratio=0.25, head_split=False)
    assert dense.query.weight.shape == (40, 32, 1, 1)
    assert dense.value.weight.shape == (40, 96, 1, 1)


def test_matches_upstream_grouped_conv_channel_order(form):
    """Output channel n*K + k of the grouped 1x1 conv is group n, class k."""
    torch.manual_seed(1)
    C, N, K, L = 16, 2, 3, 5
    head = _randomise(NoahHead(C, K, num_heads=N, drop=0.).double())
    x = torch.randn(2, L, C, dtype=torch.float64)
    img = x.transpose(1, 2).reshape(2, C, L, 1)
    q = head.query(img[:, :C // 2]).reshape(2, N, K, L)
    v = head.value(img[:, C // 2:]).reshape(2, N, K, L)
    expected = (q.softmax(-1) * v).sum((1, 3))
    torch.testing.assert_close(head(x), expected)


def test_dropout_is_unbiased_and_eval_ignores_it(form):
    torch.manual_seed(0)
    head = _randomise(NoahHead(16, 5, num_heads=2, drop=0.3).double())
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    head.eval()
    clean = head(x)
    torch.testing.assert_close(head(x), clean)
    torch.testing.assert_close(clean, reference_noah(head, x))

    head.train()
    draws = torch.stack([head(x) for _ in range(4000)])
    assert not torch.allclose(draws[0], draws[1]), 'training mode should apply dropout'
    mean, std_err = draws.mean(0), draws.std(0) / 4000 ** 0.5
    assert torch.all((mean - clean).abs() < 5 * std_err + 1e-6)


def test_dropout_variance_is_that_of_independent_masks_on_values(form):
    """Dropout masks v[b, n, k, l] independently: Var[out[b, k]] = p/(1-p) * sum_{n,l} (a v)^2."""
    torch.manual_seed(0)
    p, draws = 0.3, 6000
    head = _randomise(NoahHead(16, 4, num_heads=2, drop=p).double())
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        ones = torch.ones(2, 2, 4, 6, dtype=torch.float64)
        # each squared term (a v)^2 of group n, token l: the reference with a one-hot mask on (n, l)
        a_v_sq = torch.stack([
            (reference_noah(head, x, value_mask=ones * torch.nn.functional.one_hot(
                torch.tensor(n * 6 + l), 12).reshape(2, 1, 6).to(ones)) ** 2)
            for n in range(2) for l in range(6)]).sum(0)
        expected_var = p / (1 - p) * a_v_sq
        head.train()
        outs = torch.stack([head(x) for _ in range(draws)])
    torch.testing.assert_close(outs.var(0), expected_var, rtol=0.12, atol=1e-6)


@pytest.mark.parametrize('kwargs,fragment', [
    (dict(in_features=30, num_heads=4, key_ratio=0.5), '15'),
    (dict(in_features=32, num_heads=4, key_ratio=0.3), '9'),
    (dict(in_features=32, num_heads=4, key_ratio=0.), 'key_ratio'),
    (dict(in_features=32, num_heads=4, key_ratio=1.), 'key_ratio'),
    (dict(in_features=32, num_heads=4, key_ratio=1.5), 'key_ratio'),
    (dict(in_features=32, num_heads=0), 'noah_head_num=0'),
    (dict(in_features=32, num_classes=0), 'num_classes'),
    (dict(in_features=32, drop=1.0), 'dropout'),
])
def test_impossible_settings_raise_value_error(kwargs, fragment):
    kwargs = dict(dict(num_classes=10), **kwargs)
    with pytest.raises(ValueError, match=fragment):
        NoahHead(**kwargs)


def test_bfloat16_autocast_gives_finite_logits():
    torch.manual_seed(0)
    head = NoahHead(32, 10, num_heads=4, drop=0.).eval()
    x = torch.randn(2, 16, 32) * 30  # large scores: the softmax must not overflow
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = head(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), head(x), rtol=0.05, atol=0.5)
