"""TorchScript and FX for models made by `add_noah_head` and the registered CNN / ViT NOAH models:
scripted and traced graphs compute what eager computes (tests/test_script_trace.py: the MLP models)."""
from typing import Callable, Dict, Tuple

import pytest
import timm
import torch
import torch.fx
import torch.nn as nn
from timm.models import get_graph_node_names
from timm.models._features_fx import FeatureGraphNet
from torchvision.models.feature_extraction import create_feature_extractor

import noah_mlp  # noqa: F401  (registers the models)
from noah_mlp import add_noah_head
from noah_mlp.head import noah_logits

NUM_CLASSES = 5
_SWIN = dict(img_size=56, depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 1, 1, 1), drop_path_rate=0.)
_VIT = dict(img_size=32, depth=2)

# name: (how to build it, image size); no dropout / drop-path anywhere, so train mode is deterministic
ADAPTED: Dict[str, Tuple[str, dict, int]] = {
    'resnet': ('resnet18', dict(), 64),
    'mobilenetv3': ('mobilenetv3_small_050', dict(), 64),
    'efficientnet': ('efficientnet_b0', dict(), 64),
    'convnext': ('convnext_atto', dict(), 64),
    'regnet': ('regnetx_002', dict(), 64),
    'vit_cls': ('vit_tiny_patch16_224', _VIT, 32),
    'vit_gap': ('vit_tiny_patch16_224', dict(_VIT, class_token=False, global_pool='avg'), 32),
    'swin': ('swin_tiny_patch4_window7_224', _SWIN, 56),
    'mixer': ('mixer_s16_050_224', dict(img_size=32, patch_size=8, num_blocks=2, embed_dim=64), 32),
}
REGISTERED: Dict[str, Tuple[dict, int]] = {
    'noah_resnet18': (dict(), 64),
    'noah_mobilenetv2_035': (dict(), 64),
    'noah_mobilenetv3_small_100': (dict(), 64),
    'noah_deit_tiny_patch16_224': (_VIT, 32),
    'noah_deit_tiny_050_patch16_224': (_VIT, 32),  # the Linear + Tanh before the head (noah_pre_logits)
}
CASES = sorted(ADAPTED) + sorted(REGISTERED)


def build(case: str, **head_args) -> Tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if case in ADAPTED:
        name, kwargs, size = ADAPTED[case]
        model = add_noah_head(timm.create_model(name, num_classes=NUM_CLASSES, **kwargs), drop=0., **head_args)
    else:
        kwargs, size = REGISTERED[case]
        model = timm.create_model(case, num_classes=NUM_CLASSES, head_drop_rate=0., **kwargs, **head_args)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _forward_backward(fn: Callable, params: nn.Module, x: torch.Tensor):
    params.zero_grad(set_to_none=True)
    out = fn(x)
    (out.float() ** 2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('case', CASES)
def test_torchscript_equals_eager(case):
    model, x = build(case)
    model.eval()
    keys = list(model.state_dict())
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
        feats = model.forward_features(x)
        # pre_logits: timm's pooled embedding, scripted too
        torch.testing.assert_close(scripted.forward_head(feats, pre_logits=True),
                                   model.forward_head(feats, pre_logits=True), rtol=1e-5, atol=1e-5)
    # the model itself is left as it was; the scripted copy's head plan adds no state_dict keys
    assert 'noah_plan' not in model._modules and list(model.state_dict()) == keys
    assert not [k for k in scripted.state_dict() if k.startswith('noah_plan.')]
    assert set(keys) <= set(scripted.state_dict())


@pytest.mark.parametrize('case', ['resnet', 'mobilenetv3', 'convnext', 'vit_gap', 'noah_deit_tiny_050_patch16_224'])
def test_scripted_model_trains_and_loads_the_eager_checkpoint(case):
    """Train mode (batch-norm statistics, no dropout): same logits and gradients; a strict load of the eager
    model's state_dict (its keys are the scripted model's, plan included) changes the scripted outputs to match."""
    model, x = build(case)
    scripted = torch.jit.script(model.train())
    eager_out, eager_grads = _forward_backward(model, model, x)
    script_out, script_grads = _forward_backward(scripted, model, x)
    torch.testing.assert_close(script_out, eager_out, rtol=1e-5, atol=1e-5)
    _assert_same_grads(script_grads, eager_grads)
    assert list(scripted.state_dict()) == list(model.state_dict())

    other, _ = build(case)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    scripted.load_state_dict(other.state_dict(), strict=True)
    scripted.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), other(x), rtol=1e-5, atol=1e-5)


def test_scripted_model_without_head_gives_the_pooled_embedding():
    model, x = build('convnext')
    model.reset_classifier(0)
    model.eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(x)
        assert out.shape == (2, model.num_features)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_scripted_model_saves_and_loads(tmp_path):
    model, x = build('mobilenetv3')
    model.eval()
    torch.jit.save(torch.jit.script(model), tmp_path / 'model.pt')
    loaded = torch.jit.load(tmp_path / 'model.pt')
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', CASES)
def test_fx_trace_forward_backward_equal_eager(case):
    model, x = build(case)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
    # train mode: the same gradients for every parameter
    model.train()
    traced = torch.fx.symbolic_trace(model)
    eager_out, eager_grads = _forward_backward(model, model, x)
    traced_out, traced_grads = _forward_backward(traced, traced, x)
    torch.testing.assert_close(traced_out, eager_out, rtol=1e-5, atol=1e-5)
    _assert_same_grads(traced_grads, eager_grads)
    assert len(traced_grads) == len(list(model.parameters()))
    # the head is one recorded call of noah_logits
    assert sum(n.op == 'call_function' and n.target is noah_logits for n in traced.graph.nodes) == 1


@pytest.mark.parametrize('case', CASES)
def test_graph_node_names_contain_the_head(case):
    model, _ = build(case)
    train_nodes, eval_nodes = get_graph_node_names(model)
    call = f'{model.noah_classifier}.noah_logits'
    assert call in train_nodes and call in eval_nodes


@pytest.mark.parametrize('case', ['resnet', 'mobilenetv3', 'convnext', 'vit_cls', 'swin'])
def test_feature_extractor_returns_tokens_and_logits(case):
    model, x = build(case)
    model.eval()
    path = model.noah_classifier
    _, eval_nodes = get_graph_node_names(model)
    tokens_node = next(n for n in eval_nodes if n.startswith('noah_feature_tokens'))
    extractor = create_feature_extractor(model, {tokens_node: 'tokens', path: 'logits'})
    with torch.no_grad():
        out = extractor(x)
        tokens, _ = model.forward_noah_tokens(model.forward_features(x))
        if not model.noah_token_stages:  # else the token stages run after the layout step
            torch.testing.assert_close(out['tokens'], tokens)
        assert out['tokens'].shape[:2] == tokens.shape[:2]
        torch.testing.assert_close(out['logits'], model(x))
    # and the FX graph scripts (timm's FX + TorchScript path)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(extractor)(x)['logits'], model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case, out_indices', [('resnet', (1, 3)), ('convnext', (0, 3)), ('vit_cls', (0, 1))])
def test_timm_fx_feature_net_equals_the_backbones_features(case, out_indices):
    """timm's FeatureGraphNet (feature_cls='fx') over a NOAH model: the backbone's stage outputs."""
    model, x = build(case)
    model.eval()
    net = FeatureGraphNet(model, out_indices=out_indices).eval()
    with torch.no_grad():
        feats = net(x)
        expected = model.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    assert len(feats) == len(out_indices)
    for a, b in zip(feats, expected, strict=True):
        if a.ndim == 3:  # ViT blocks: tokens, forward_intermediates lays them out as maps
            a = a[:, model.num_prefix_tokens:].transpose(1, 2).reshape(b.shape)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', sorted(REGISTERED))
def test_registered_models_give_timms_fx_features(name):
    """features_only=True is timm's own feature extractor of the backbone; its FX form runs too."""
    kwargs, size = REGISTERED[name]
    if 'deit' in name:
        kwargs = dict(kwargs, out_indices=(0, 1))  # 2 blocks
    model = timm.create_model(name, features_only=True, feature_cls='fx', **kwargs).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, size, size))
    # CNN maps (B, C, H, W); ViT blocks give tokens (B, L, C) under FX
    assert [f.shape[-1] if f.ndim == 3 else f.shape[1] for f in feats] == model.feature_info.channels()
