"""TorchScript and FX for every NOAH model: scripted / traced graphs compute what eager computes."""
import pytest
import timm
import torch
import torch.fx
from timm.models import get_graph_node_names
from torchvision.models.feature_extraction import create_feature_extractor

import noah_mlp  # noqa: F401
from noah_mlp import NoahHead
from noah_mlp.head import noah_logits

NOAH_MODELS = timm.list_models('noah_*', module='mlp_mixer')  # the CNN / ViT twins: tests/test_models_beyond.py
# 32 px, 8 px patches (16 tokens), 2 blocks: every architecture, a fraction of a second each
TINY = dict(img_size=32, patch_size=8, num_blocks=2, num_classes=10)


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(TINY, **kwargs))


def _grads(model: torch.nn.Module):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def _forward_backward(fn, model, x):
    model.zero_grad(set_to_none=True)
    out = fn(x)
    (out.float() ** 2).sum().backward()
    return out.detach(), _grads(model)


@pytest.mark.parametrize('name', NOAH_MODELS)
def test_torchscript_equals_eager(name):
    model = tiny(name, head_drop_rate=0.).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
    # train mode (no dropout anywhere): same logits and the same gradients
    model.train()
    scripted.train()
    eager_out, eager_grads = _forward_backward(model, model, x)
    script_out, script_grads = _forward_backward(scripted, model, x)
    torch.testing.assert_close(script_out, eager_out, rtol=1e-5, atol=1e-5)
    _assert_same_grads(script_grads, eager_grads)


def test_torchscript_head_dropout_has_the_eager_statistics():
    """Scripted, the head takes the SDPA dropout path; its mean over draws is the eval output, as eager's is."""
    torch.manual_seed(0)
    head = NoahHead(16, 3, num_heads=2, key_ratio=0.5, drop=0.3)
    scripted = torch.jit.script(head)
    x = torch.randn(2, 5, 16)
    expected = head.eval()(x)
    head.train()
    scripted.train()
    draws = {'eager': torch.stack([head(x) for _ in range(3000)]),
             'scripted': torch.stack([scripted(x) for _ in range(3000)])}
    for kind, out in draws.items():
        assert out.std(0).min() > 1e-3, f'{kind}: dropout did not act'
        torch.testing.assert_close(out.mean(0), expected, rtol=0, atol=0.05, msg=kind)
    torch.testing.assert_close(draws['scripted'].std(0), draws['eager'].std(0), rtol=0.15, atol=0.01)


@pytest.mark.parametrize('name', NOAH_MODELS)
def test_fx_symbolic_trace_forward_backward_and_script(name):
    model = tiny(name, head_drop_rate=0.).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    eager_out, eager_grads = _forward_backward(model, model, x)
    traced_out, traced_grads = _forward_backward(traced, traced, x)
    torch.testing.assert_close(traced_out, eager_out, rtol=1e-5, atol=1e-5)
    _assert_same_grads(traced_grads, eager_grads)
    # the FX graph scripts too (timm's FX + TorchScript path)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(traced)(x), eager_out, rtol=1e-5, atol=1e-5)


def test_fx_trace_keeps_the_eager_dropout_kernel():
    """The head's computation is one recorded call that picks its form and kernel when it runs: a model
    traced in train mode draws the same dropout masks from the same seed as eager (the chunked CPU kernel)."""
    model = tiny('noah_gmlp_ti16_224', head_drop_rate=0.2).train()
    traced = torch.fx.symbolic_trace(model)
    calls = [n for n in traced.graph.nodes if n.op == 'call_function' and n.target is noah_logits]
    assert len(calls) == 1
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    eager = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(traced(x), eager, rtol=1e-6, atol=1e-6)
    torch.manual_seed(2)
    assert not torch.allclose(traced(x), eager)


@pytest.mark.parametrize('name', NOAH_MODELS)
def test_fx_features_only_equals_feature_getter(name):
    kwargs = dict(TINY, num_blocks=4, out_indices=(1, 3))
    torch.manual_seed(0)
    getter = timm.create_model(name, features_only=True, **kwargs).eval()
    torch.manual_seed(0)
    fx = timm.create_model(name, features_only=True, feature_cls='fx', **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(fx(x), getter(x), strict=True):
            # FX returns the blocks' tokens (B, L, C), the getter timm's (B, C, H, W) maps
            assert a.shape == (2, 16, b.shape[1]) and b.shape[2:] == (4, 4)
            torch.testing.assert_close(a.transpose(1, 2).reshape(b.shape), b)


@pytest.mark.parametrize('name', ['noah_mixer_s16_224', 'noah_resmlp_12_224', 'noah_gmlp_ti16_224'])
def test_torchvision_feature_extractor_returns_tokens_and_logits(name):
    model = tiny(name).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert 'head.noah_logits' in eval_nodes and 'head.noah_logits' in train_nodes
    extractor = create_feature_extractor(model, {'norm': 'tokens', 'head.noah_logits': 'head_call', 'head': 'logits'})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out['tokens'], model.forward_features(x))
        torch.testing.assert_close(out['logits'], model(x))
    # the query bias cannot change a softmax: the recorded call already gives the logits
    torch.testing.assert_close(out['head_call'], out['logits'])
