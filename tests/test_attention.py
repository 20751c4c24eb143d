"""noah_mlp.attention: per-class, per-group attention maps of the NOAH head."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import MlpMixer

import noah_mlp  # noqa: F401  (registers the models)
from noah_mlp import attention as att_mod
from noah_mlp.attention import attention_maps, noah_attention

TINY = dict(img_size=32, patch_size=8, num_blocks=2, num_classes=7)


def tiny(name='noah_gmlp_ti16_224', seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **dict(TINY, **kwargs))
    # random head parameters (biases included) so that every term of the formula matters
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def reference_values(model, tokens):
    """v[b, n, k, l] straight from the value convolution's weights (output channel n*K + k)."""
    head = model.head
    B, L, C = tokens.shape
    N, K = head.num_heads, head.num_classes
    xv = tokens[..., head.key_chs:] if head.kv_split else tokens
    wv = head.value.weight.reshape(N, K, -1)
    bv = head.value.bias.reshape(N, K)
    if head.head_split:
        xv = xv.reshape(B, L, N, -1)
    else:
        xv = xv.unsqueeze(2).expand(B, L, N, xv.shape[-1])
    return torch.einsum('blnd,nkd->bnkl', xv, wv) + bv[None, :, :, None]


VARIANTS = [
    ('noah_gmlp_ti16_224', {}),
    ('noah_mixer_s16_224', dict(embed_dim=64)),
    ('noah_gmlp_ti16_224', dict(head_split=False)),
    ('noah_gmlp_ti16_224', dict(kv_split=False)),
    ('noah_resmlp_12_224', dict(embed_dim=48, key_ratio=0.25, noah_head_num=2)),
]


@pytest.mark.parametrize('name,kwargs', VARIANTS)
def test_logits_recomputed_from_maps_and_values(name, kwargs):
    model = tiny(name, **kwargs)
    x = torch.randn(3, 3, 32, 32)
    K = model.head.num_classes
    maps = attention_maps(model, x, classes=list(range(K)))  # (B, N, K, H', W')
    assert maps.shape == (3, model.head.num_heads, K, 4, 4)
    with torch.no_grad():
        out = model(x)
        v = reference_values(model, model.forward_features(x))  # (B, N, K, L)
    recomputed = (maps.flatten(3) * v).sum(dim=(1, 3))
    torch.testing.assert_close(recomputed, out, atol=1e-5, rtol=1e-5)
    # the values returned alongside the maps are the same per-token evidence
    res = noah_attention(model, x, classes=list(range(K)))
    torch.testing.assert_close(res.values.flatten(3), v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.logits, out)


def test_maps_are_distributions_with_expected_shapes():
    model = tiny(img_size=(32, 48))  # non-square grid 4 x 6
    x = torch.randn(2, 3, 32, 48)
    top1 = attention_maps(model, x)
    assert top1.shape == (2, 4, 1, 4, 6)
    assert top1.dtype == torch.float32 and not top1.requires_grad
    assert (top1 >= 0).all()
    torch.testing.assert_close(top1.sum(dim=(-1, -2)), torch.ones(2, 4, 1))

    shared = attention_maps(model, x, classes=[5, 0, 2])
    assert shared.shape == (2, 4, 3, 4, 6)
    torch.testing.assert_close(shared.sum(dim=(-1, -2)), torch.ones(2, 4, 3))
    assert attention_maps(model, x, classes=3).shape == (2, 4, 1, 4, 6)
    assert attention_maps(model, x, classes=torch.tensor([6, 1])).shape == (2, 4, 2, 4, 6)

    # classes=None is each image's own top-1 class
    full = attention_maps(model, x, classes=list(range(7)))
    pred = model(x).argmax(-1)
    for b in range(2):
        torch.testing.assert_close(top1[b, :, 0], full[b, :, int(pred[b])])
    # per-image classes as a (B, k) tensor
    per_image = torch.tensor([[3, 4], [6, 0]])
    res = noah_attention(model, x, classes=per_image)
    assert torch.equal(res.classes, per_image)
    torch.testing.assert_close(res.maps[1, :, 0], full[1, :, 6])
    torch.testing.assert_close(res.maps[0, :, 1], full[0, :, 4])
    # topk predicted classes, best first
    res = noah_attention(model, x, topk=3)
    assert torch.equal(res.classes, model(x).topk(3).indices)


def test_grid_layout_matches_image_patches():
    # without blocks each token sees only its own patch: changing patch (row 2, col 5) of the
    # image must change the score of map position (2, 5) and nothing else (up to the softmax shift)
    model = tiny('noah_mixer_s16_224', embed_dim=64, num_blocks=0, img_size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    y = x.clone()
    y[..., 16:24, 40:48] += 3.0
    a = attention_maps(model, x, classes=list(range(7)))
    b = attention_maps(model, y, classes=list(range(7)))
    shift = (b.log() - a.log())  # (1, N, K, 4, 6): constant except where the patch changed
    shift = shift - shift[..., :1, :1]
    changed = shift.abs() > 1e-4
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[2, 5] = True
    assert (changed == expected).all(dim=(-1, -2)).float().mean() > 0.9
    assert changed[..., 2, 5].any()
    assert not changed[..., expected.logical_not()].any()


def test_uses_eval_mode_and_restores_train_state():
    model = tiny(drop_rate=0.5, head_drop_rate=0.5, proj_drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    expected = attention_maps(model, x, classes=[0, 1])
    model.train()
    model.blocks[0].eval()  # a mixed state must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    got = attention_maps(model, x, classes=[0, 1])
    torch.testing.assert_close(got, expected)  # no dropout in the maps
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_batch_chunking_gives_the_same_maps(monkeypatch):
    model = tiny()
    x = torch.randn(5, 3, 32, 32)
    whole = noah_attention(model, x, topk=2)
    monkeypatch.setattr(att_mod, '_MAX_SCORE_ELEMENTS', 1)  # one image per chunk
    chunked = noah_attention(model, x, topk=2)
    torch.testing.assert_close(chunked.maps, whole.maps)
    assert torch.equal(chunked.classes, whole.classes)


def test_refuses_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match='built for 32x32'):
        attention_maps(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match='channels'):
        attention_maps(model, torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        attention_maps(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r'\[0, 7\)'):
        attention_maps(model, torch.randn(1, 3, 32, 32), classes=[7])
    with pytest.raises(ValueError, match=r'\[0, 7\)'):
        attention_maps(model, torch.randn(1, 3, 32, 32), classes=[-1])
    with pytest.raises(TypeError, match='integers'):
        attention_maps(model, torch.randn(1, 3, 32, 32), classes=torch.tensor([0.5]))
    with pytest.raises(ValueError, match='shape'):
        attention_maps(model, torch.randn(2, 3, 32, 32), classes=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match='topk'):
        noah_attention(model, torch.randn(1, 3, 32, 32), topk=8)

    torch.manual_seed(0)
    linear = MlpMixer(img_size=32, patch_size=8, num_blocks=1, embed_dim=32, num_classes=7)  # timm's linear head
    with pytest.raises(TypeError, match='not a NOAH model'):
        attention_maps(linear, torch.randn(1, 3, 32, 32))
    headless = timm.create_model('noah_gmlp_ti16_224', **dict(TINY, num_classes=0))
    with pytest.raises(TypeError, match='not a NOAH model'):
        attention_maps(headless, torch.randn(1, 3, 32, 32))


def _square_batch(n, generator, size=32, square=6):
    """Noise images with one bright square at a random place; the class is the square's colour."""
    x = 0.3 * torch.randn(n, 3, size, size, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    r0 = torch.randint(0, size - square + 1, (n,), generator=generator)
    c0 = torch.randint(0, size - square + 1, (n,), generator=generator)
    mask = torch.zeros(n, 1, size, size)
    for i in range(n):
        mask[i, :, r0[i]:r0[i] + square, c0[i]:c0[i] + square] = 1
    colour = F.one_hot(y, 3).float()[:, :, None, None]
    return x + 2 * mask * colour, y, mask


def _mass_on_square(model, x, y, mask):
    maps = attention_maps(model, x, classes=y[:, None])[:, :, 0]  # (B, N, 4, 4), the true class
    on_square = (F.avg_pool2d(mask, 8)[:, 0] > 0).float()  # tokens the square touches
    return (maps * on_square[:, None]).sum(dim=(-1, -2)).mean().item(), on_square.mean().item()


@pytest.fixture
def one_thread():
    # tiny ops on a shared machine: one intra-op thread is several times faster than spinning two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trained_model_attends_to_the_object(one_thread):
    torch.manual_seed(0)
    model = timm.create_model(
        'noah_gmlp_ti16_224', img_size=32, patch_size=8, num_blocks=2, embed_dim=64, num_classes=3,
        head_drop_rate=0.)
    x_test, y_test, mask_test = _square_batch(128, torch.Generator().manual_seed(2))
    mass_before, uniform = _mass_on_square(model, x_test, y_test, mask_test)

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        x, y, _ = _square_batch(64, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    mass_after, _ = _mass_on_square(model, x_test, y_test, mask_test)
    assert accuracy > 0.9
    # the square touches ~15% of the tokens: an untrained head spreads its attention about evenly,
    # the trained one puts several times that share on the square (3.6x-4.4x over four seeds)
    assert mass_before < 1.5 * uniform, (mass_before, uniform)
    assert mass_after > 2.5 * uniform, (mass_after, uniform)
