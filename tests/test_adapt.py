"""add_noah_head: a NOAH head on timm CNNs, ViTs, Swin and Mixers, checked against the formula."""
import copy
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

import noah_mlp  # noqa: F401  (registers the models)
from noah_mlp import add_noah_head, attention_maps, noah_attention
from noah_mlp.adapt import UnsupportedModelError, is_noah_adapted
from noah_mlp.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nchw(model, feats):
    return feats.flatten(2).transpose(1, 2)


def _mobilenetv3(model, feats):  # the head conv runs at every position, as in the NOAH authors' MobileNetV3
    return _nchw(model, model.act2(model.norm_head(model.conv_head(feats))))


def _convnext(model, feats):  # the head's LayerNorm2d at every position, then its (identity) pre-logits
    return model.head.pre_logits(_nchw(model, model.head.norm(feats)))


def _patch_tokens(model, feats):  # ViT / DeiT: the class token is left out
    return model.fc_norm(feats[:, model.num_prefix_tokens:])


def _nhwc(model, feats):
    return feats.flatten(1, 2)


def _nlc(model, feats):
    return feats


# timm name, tiny architecture arguments, image size, the final tokens NOAH must attend over
FAMILIES = {
    'resnet': ('resnet18', dict(), 64, _nchw),
    'mobilenetv3': ('mobilenetv3_small_050', dict(), 64, _mobilenetv3),
    'efficientnet': ('efficientnet_b0', dict(), 64, _nchw),
    'convnext': ('convnext_atto', dict(), 64, _convnext),
    'regnet': ('regnetx_002', dict(), 64, _nchw),
    'vit_cls': ('vit_tiny_patch16_224', dict(img_size=32, depth=2), 32, _patch_tokens),
    'deit_no_cls': ('deit_tiny_patch16_224', dict(img_size=32, depth=2, class_token=False, global_pool='avg',
                                                  fc_norm=False), 32, _patch_tokens),
    'vit_reg_gap': ('vit_betwixt_patch16_reg4_gap_256', dict(img_size=32, depth=1, embed_dim=64, num_heads=2), 32,
                    _patch_tokens),
    'swin': ('swin_tiny_patch4_window7_224', dict(img_size=56, depths=(1, 1, 1, 1), embed_dim=32,
                                                  num_heads=(1, 1, 1, 1)), 56, _nhwc),
    'mixer': ('mixer_s16_050_224', dict(img_size=32, patch_size=8, num_blocks=2, embed_dim=64), 32, _nlc),
}
NUM_CLASSES = 7


def build(family, seed=0, **head_args):
    name, kwargs, size, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = add_noah_head(timm.create_model(name, num_classes=NUM_CLASSES, **kwargs), **head_args)
    with torch.no_grad():  # random head biases too, so that every term of the formula matters
        for p in model.noah_head.parameters():
            p.normal_(0, 0.3)
    return model, torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_logits(head, tokens):
    """out[b,k] = sum_n sum_l softmax_l(q)[b,n,k,l] * v[b,n,k,l], straight from the grouped convolutions."""
    B, L, C = tokens.shape
    N, K = head.num_heads, head.num_classes
    ck = int(C * head.key_ratio)
    xk = tokens[..., :ck].reshape(B, L, N, -1)
    xv = tokens[..., ck:].reshape(B, L, N, -1)
    wq, bq = head.query.weight.reshape(N, K, -1), head.query.bias.reshape(N, K, 1)
    wv, bv = head.value.weight.reshape(N, K, -1), head.value.bias.reshape(N, K, 1)
    q = torch.einsum('blnd,nkd->bnkl', xk, wq) + bq
    v = torch.einsum('blnd,nkd->bnkl', xv, wv) + bv
    return (q.softmax(-1) * v).sum(dim=(1, 3))


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_logits_are_the_noah_formula_on_the_models_final_tokens(family):
    model, x = build(family, key_ratio=0.25)
    model.eval()
    tokens_of = FAMILIES[family][3]
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = reference_logits(model.noah_head, tokens_of(model, feats))
        logits = model(x)
    assert logits.shape == (3, NUM_CLASSES)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert is_noah_adapted(model) and model.get_classifier() is model.noah_head
    path = model.noah_classifier
    assert model.pretrained_cfg['classifier'] == (f'{path}.query', f'{path}.value')


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_pre_logits_stay_timms_pooled_embedding(family):
    name, kwargs, _, _ = FAMILIES[family]
    model, x = build(family)
    stock = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(model.noah_classifier + '.')}
    stock.load_state_dict(backbone, strict=False)
    model.eval(), stock.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = stock.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), expected)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_training_step_reaches_head_and_backbone(family):
    model, x = build(family)
    model.train()
    first = next(p for p in model.parameters())
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
    loss.backward()
    head = model.noah_head
    for p in (head.query.weight, head.value.weight, head.value.bias, first):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert head.query.weight.grad.abs().sum() > 0 and head.value.weight.grad.abs().sum() > 0
    assert first.grad.abs().sum() > 0
    before = head.value.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, head.value.weight)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_attention_maps_lie_on_the_models_own_grid(family):
    model, x = build(family)
    att = noah_attention(model, x, topk=2)
    B, N = x.shape[0], model.noah_head.num_heads
    assert att.maps.shape[:3] == (B, N, 2)
    torch.testing.assert_close(att.maps.sum(dim=(-2, -1)), torch.ones(B, N, 2))
    # the maps are the weights the head used: sum over groups and tokens of maps * values == logits
    chosen = att.logits.gather(1, att.classes)
    torch.testing.assert_close((att.maps * att.values).sum(dim=(1, 3, 4)), chosen, rtol=1e-4, atol=1e-4)
    tokens = att.maps.shape[-2] * att.maps.shape[-1]
    model.eval()
    with torch.no_grad():
        assert model.forward_noah_tokens(model.forward_features(x))[0].shape[1] == tokens
    assert attention_maps(model, x, classes=[1]).shape == (B, N, 1, *att.maps.shape[-2:])


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_save_for_hf_and_local_dir_round_trip(family, tmp_path):
    model, x = build(family, key_ratio=0.25, num_heads=2)
    model.eval()
    timm.models.save_for_hf(model, str(tmp_path), safe_serialization=True)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'with_noah_head'
    assert config['model_args']['backbone'] == FAMILIES[family][0]
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(loaded) is type(model) and loaded.noah_head.num_heads == 2 and loaded.noah_head.key_ratio == 0.25
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    tuned = timm.create_model(f'local-dir:{tmp_path}', pretrained=True, num_classes=3)
    assert tuned.noah_head.num_classes == 3
    first = next(iter(model.state_dict()))
    assert torch.equal(tuned.state_dict()[first], model.state_dict()[first])  # backbone kept, head new


def test_reset_classifier_builds_a_new_noah_head_or_none():
    model, x = build('convnext', num_heads=2)
    model.reset_classifier(5)
    assert model.noah_head.num_classes == 5 and model.noah_head.num_heads == 2
    assert model.get_classifier() is model.head.fc is model.noah_head
    assert model.eval()(x).shape == (3, 5)
    model.reset_classifier(0)
    assert model.noah_head is None
    assert model(x).shape == (3, model.num_features)  # timm's pooled embedding
    with pytest.raises(TypeError, match='not a NOAH model'):
        attention_maps(model, x)


def test_grad_checkpointing_keeps_logits():
    model, x = build('vit_cls', drop=0.)
    model.train()
    plain = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), plain)


def test_hidden_size_maps_tokens_before_the_head():
    model, x = build('deit_no_cls', hidden_size=48)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        tokens = torch.tanh(model.noah_pre_logits.fc(tokens))
        torch.testing.assert_close(model(x), reference_logits(model.noah_head, tokens), rtol=1e-4, atol=1e-4)
    assert model.noah_head.in_features == 48


@pytest.mark.parametrize('name, kwargs, match', [
    ('deit_tiny_distilled_patch16_224', dict(img_size=32, depth=1), 'two classifiers'),
    ('vit_tiny_patch16_224', dict(img_size=32, depth=1, global_pool='map'), "global_pool='map'"),
    ('noah_resnet18', dict(), 'already has a NOAH head'),
])
def test_refuses_models_it_cannot_interpret(name, kwargs, match):
    model = timm.create_model(name, num_classes=4, **kwargs)
    with pytest.raises(UnsupportedModelError, match=match) as info:
        add_noah_head(model)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert not is_noah_adapted(model) or name.startswith('noah_')


def test_refuses_modules_that_are_not_timm_classifiers():
    with pytest.raises(UnsupportedModelError, match='not a timm classification model'):
        add_noah_head(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4)))


def test_channel_split_that_does_not_fit_names_the_numbers():
    model = timm.create_model('resnet18', num_classes=4)
    with pytest.raises(ValueError, match='divisible by 3'):
        add_noah_head(model, num_heads=3)


def test_torch_compile_matches_eager():
    model, x = build('vit_cls')  # one family: compiling takes ~20 s on 2 cores
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_whole_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    model, x = build('resnet')
    model.eval()
    path = tmp_path / 'model.pt'
    torch.save(model, path)
    torch.save(x, tmp_path / 'x.pt')
    with torch.no_grad():
        torch.save(model(x), tmp_path / 'expected.pt')
    code = ('import sys, torch; d = sys.argv[1]; m = torch.load(d + "/model.pt", weights_only=False).eval(); '
            'x = torch.load(d + "/x.pt"); torch.testing.assert_close(m(x), torch.load(d + "/expected.pt")); '
            'print(type(m).__name__)')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == type(model).__name__
    copied = copy.deepcopy(model)
    assert type(copied) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x))


def test_noah_class_builds_a_model_from_the_timm_class_arguments():
    from timm.models.resnet import BasicBlock, ResNet
    from noah_mlp.adapt import noah_class
    model = noah_class(ResNet)(block=BasicBlock, layers=(1, 1, 1, 1), num_classes=5, noah_head_num=2, key_ratio=0.25)
    assert type(model).timm_class is ResNet and noah_class(ResNet) is type(model)
    assert (model.noah_head.num_heads, model.noah_head.key_ratio, model.noah_head.num_classes) == (2, 0.25, 5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_with_noah_head_starts_from_a_stock_checkpoint(tmp_path):
    name, kwargs, size, _ = FAMILIES['regnet']
    stock = timm.create_model(name, **kwargs).eval()
    torch.save(stock.state_dict(), tmp_path / 'stock.pth')
    model = timm.create_model('with_noah_head', backbone=name, pretrained=True, num_classes=4, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'stock.pth'))).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), stock.forward_features(x))
    assert model.noah_head.num_classes == 4
