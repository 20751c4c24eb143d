"""Deploying NOAH models: ONNX export checked in onnxruntime, torch.compile(fullgraph=True) against eager."""
import pytest
import timm
import torch

import noah_mlp  # noqa: F401  (registers the noah_ models)
from noah_mlp.sharing import check_onnx, export_onnx

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

TINY = dict(img_size=32, patch_size=8, num_blocks=2, num_classes=7)
# r=1/4 pads keys and values to one head size; the Mixer case uses the dense, unsplit head
CASES = {
    'gmlp_r025': ('noah_gmlp_ti16_224', dict(TINY, noah_head_num=2, key_ratio=0.25)),
    'mixer_dense': ('noah_mixer_s16_050_224', dict(TINY, embed_dim=64, kv_split=False, head_split=False)),
}


def _model(case, **overrides):
    name, kwargs = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(kwargs, **overrides))
    with torch.no_grad():  # non-zero head biases, so that a head exported without them shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize('dynamo', [True, False], ids=['dynamo', 'torchscript'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_onnx_export_matches_pytorch_for_any_batch(tmp_path, case, dynamo):
    model = _model(case).train()  # value dropout 0.1 in training: the file must hold the eval-mode graph
    path = export_onnx(model, tmp_path / 'model.onnx', dynamo=dynamo)
    assert model.training, 'export_onnx must restore the train/eval mode'
    assert path == tmp_path / 'model.onnx' and path.is_file()
    assert not list(tmp_path.glob('*.data')), 'small models keep their weights inside the .onnx file'
    onnx.checker.check_model(str(path))

    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ('input', 'logits')
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # symbolic batch
    if dynamo:  # the TorchScript exporter may leave the class dimension symbolic
        assert out.shape[1] == 7

    # one file, batch sizes 1 and 3, against eager PyTorch in eval mode
    worst = check_onnx(model, path, batch_sizes=(1, 3), atol=1e-4)
    assert worst <= 1e-4
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {'input': x.numpy()})[0]
    assert got.shape == (3, 7)
    assert abs(got - expected).max() <= 1e-4


def test_check_onnx_catches_a_mismatch(tmp_path):
    model = _model('gmlp_r025')
    path = export_onnx(model, tmp_path / 'model.onnx', dynamo=False)  # the faster exporter is enough here
    assert check_onnx(model, path) <= 1e-4
    with torch.no_grad():
        model.head.value.bias.add_(0.5)  # the PyTorch model moves on, the file does not
    with pytest.raises(RuntimeError, match='differ'):
        check_onnx(model, path)


def test_onnx_fixed_batch_and_opset(tmp_path):
    model = _model('gmlp_r025')
    path = export_onnx(model, tmp_path / 'fixed.onnx', dynamic_batch=False, opset=18, dynamo=False)
    proto = onnx.load(str(path))
    assert {o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')} == {18}
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == [2, 3, 32, 32]
    assert check_onnx(model, path, batch_sizes=(2,)) <= 1e-4


def test_torch_compile_fullgraph_matches_eager():
    """One compiled module, eval (logits) then train mode without dropout (logits and gradients)."""
    torch._dynamo.reset()
    model = _model('gmlp_r025', head_drop_rate=0., num_blocks=1)  # deterministic train mode; one block compiles faster
    assert model.head.drop == 0.
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 3, 32, 32)

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)

    model.train()
    out = compiled(x)
    (out * torch.arange(7.)).square().sum().backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    (ref * torch.arange(7.)).square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        # fp32 sums in another order: compare against the gradient's own scale (entries near 0 included)
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
