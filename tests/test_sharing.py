"""Sharing NOAH models as timm / Hugging Face folders: save_for_hf, local-dir and hf-hub reload, fine-tuning."""
import json

import pytest
import timm
import torch
from timm.models import save_for_hf

import noah_mlp  # noqa: F401  (registers the noah_ models)
from noah_mlp.models import mlp_mixer as noah_models
from noah_mlp.sharing import model_input_size, save_pretrained_folder

# tiny gMLP with every reconstruction-relevant setting away from its default
GMLP = ('noah_gmlp_ti16_224', dict(
    noah_head_num=2, key_ratio=0.25, num_classes=7, img_size=32, patch_size=8, num_blocks=2))
# tiny Mixer: narrower, other MLP ratios, dense head without key/value split
MIXER = ('noah_mixer_s16_050_224', dict(
    noah_head_num=8, kv_split=False, head_split=False, embed_dim=64, mlp_ratio=(0.25, 2.0),
    num_classes=3, img_size=48, patch_size=16, num_blocks=2))


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter away from its initial value (zero biases etc.), so that loading shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _build(name, kwargs, how):
    if how == 'create_model':
        return timm.create_model(name, **kwargs)
    return getattr(noah_models, name)(**kwargs)  # entrypoint called directly, not through the factory


def _input_size(model):
    return model_input_size(model)


def _inputs(model, batch=2):
    return torch.randn(batch, *_input_size(model))


@pytest.mark.parametrize('how', ['create_model', 'entrypoint'])
@pytest.mark.parametrize('name,kwargs', [GMLP, MIXER], ids=['gmlp', 'mixer'])
def test_plain_save_for_hf_round_trip(tmp_path, name, kwargs, how):
    torch.manual_seed(0)
    model = _randomise(_build(name, kwargs, how))
    save_for_hf(model, tmp_path, safe_serialization=True)  # no extra arguments: the model carries them
    assert (tmp_path / 'model.safetensors').is_file()
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == name
    assert config['num_classes'] == kwargs['num_classes']
    for key, value in kwargs.items():
        expected = list(value) if isinstance(value, tuple) else value
        if key == 'img_size':
            expected = [value, value]
        assert config['model_args'][key] == expected, key

    torch.manual_seed(1)  # a rebuild that failed to load the weights would differ
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(loaded) is type(model)
    head = loaded.head
    assert (head.num_heads, head.key_ratio, head.kv_split, head.head_split, head.num_classes) == (
        model.head.num_heads, model.head.key_ratio, model.head.kv_split, model.head.head_split,
        kwargs['num_classes'])
    size = kwargs['img_size']
    assert _input_size(loaded) == _input_size(model) == (3, size, size)
    x = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_fine_tune_keeps_backbone_and_starts_fresh_head(tmp_path):
    name, kwargs = GMLP
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, **kwargs))
    save_for_hf(model, tmp_path, safe_serialization=True)

    tuned = timm.create_model(f'local-dir:{tmp_path}', pretrained=True, num_classes=5)
    assert tuned.num_classes == 5 and tuned.head.num_classes == 5
    # NOAH settings and architecture come from the folder, the class count from the caller
    assert (tuned.head.num_heads, tuned.head.key_ratio) == (2, 0.25)
    assert len(tuned.blocks) == 2 and _input_size(tuned) == (3, 32, 32)
    assert tuned.head.query.weight.shape == (2 * 5, 32 // 2, 1, 1)
    assert tuned.head.value.weight.shape == (2 * 5, 96 // 2, 1, 1)

    source = model.state_dict()
    target = tuned.state_dict()
    backbone = [k for k in source if not k.startswith('head.')]
    assert backbone and set(backbone) == {k for k in target if not k.startswith('head.')}
    for key in backbone:
        assert torch.equal(source[key], target[key]), key
    # fresh head: upstream init (zero biases), not the saved (randomised) one
    assert torch.count_nonzero(tuned.head.query.bias) == 0
    assert torch.count_nonzero(tuned.head.value.bias) == 0
    assert tuned.head.query.weight.std() > 0
    tuned.eval()
    assert tuned(torch.randn(2, 3, 32, 32)).shape == (2, 5)

    # the fine-tuned model shares again, with its new class count
    out = save_pretrained_folder(tuned, tmp_path / 'tuned', label_names=list('abcde'))
    again = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), tuned(x), rtol=0, atol=0)


def test_save_pretrained_folder_label_names_and_wrappers(tmp_path):
    name, kwargs = GMLP
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, **kwargs))
    names = [f'class_{i}' for i in range(7)]
    # a torch.compile wrapper (not run, so nothing compiles) is unwrapped to the timm model
    out = save_pretrained_folder(torch.compile(model), tmp_path / 'folder', label_names=names)
    assert out == tmp_path / 'folder'
    config = json.loads((out / 'config.json').read_text())
    assert config['label_names'] == names
    assert config['model_args']['noah_head_num'] == 2 and config['model_args']['head_split'] is True
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert list(loaded.pretrained_cfg['label_names']) == names
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    with pytest.raises(ValueError, match='7'):
        save_pretrained_folder(model, tmp_path / 'bad', label_names=names + ['extra'])
    # fewer names than classes (e.g. --num-classes above the dataset's count): the named ones, by index
    out = save_pretrained_folder(model, tmp_path / 'some', label_names=names[:3])
    assert json.loads((out / 'config.json').read_text())['label_names'] == {'0': 'class_0', '1': 'class_1',
                                                                             '2': 'class_2'}
    out = save_pretrained_folder(model, tmp_path / 'none', label_names=[])
    assert 'label_names' not in json.loads((out / 'config.json').read_text())
    with pytest.raises(ValueError, match='pretrained_cfg'):
        save_pretrained_folder(noah_mlp.NoahMlpMixer(num_classes=2, img_size=32, patch_size=8, num_blocks=1,
                                                     embed_dim=16), tmp_path / 'bare')


def test_helper_rebuilds_model_whose_factory_args_were_lost(tmp_path):
    """The helper writes the NOAH head settings from the model itself, not only from recorded arguments."""
    name, kwargs = GMLP
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, **kwargs))
    model._model_args = {k: v for k, v in model._model_args.items() if k not in ('noah_head_num', 'key_ratio')}
    out = save_pretrained_folder(model, tmp_path)
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_hf_hub_loading_reads_the_same_folder(tmp_path, monkeypatch):
    """'hf-hub:USER/REPO' parses the same config.json; the download is served from the saved folder."""
    import timm.models._hub as hub

    name, kwargs = GMLP
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, **kwargs))
    save_pretrained_folder(model, tmp_path, label_names=[str(i) for i in range(7)])
    requested = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, **_):
        requested.append((repo_id, filename))
        path = tmp_path / filename
        if not path.is_file():
            raise FileNotFoundError(path)
        return str(path)

    monkeypatch.setattr(hub, 'hf_hub_download', fake_download)
    loaded = timm.create_model('hf-hub:someone/noah-gmlp-tiny', pretrained=True).eval()
    assert ('someone/noah-gmlp-tiny', 'config.json') in requested
    assert ('someone/noah-gmlp-tiny', 'model.safetensors') in requested
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_train_save_hf_writes_the_best_checkpoint_with_class_names(tmp_path):
    """`noah-train ... --save-hf DIR`: one tiny epoch, then the folder reloads with the checkpoint's weights."""
    import numpy as np
    from PIL import Image

    from noah_mlp.train import main as train_main

    rng = np.random.default_rng(0)
    classes = ['cat', 'dog', 'eel']
    for split in ('train', 'validation'):
        for name in classes:
            (tmp_path / 'data' / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / 'data' / split / name / f'{i}.png')
    out_dir, hf_dir = tmp_path / 'out', tmp_path / 'hf'
    code = train_main([
        str(tmp_path / 'data'), '--model', 'noah_gmlp_ti16_224', '--img-size', '32',
        '--model-kwargs', 'patch_size=8', 'num_blocks=1', 'noah_head_num=2', 'key_ratio=0.25',
        '--epochs', '1', '--warmup-epochs', '0', '-b', '3', '--workers', '0',
        '--output', str(out_dir), '--save-hf', str(hf_dir)])
    assert code == 0
    config = json.loads((hf_dir / 'config.json').read_text())
    assert config['label_names'] == classes and config['num_classes'] == 3
    assert config['model_args']['noah_head_num'] == 2 and config['model_args']['key_ratio'] == 0.25

    (best,) = out_dir.glob('*/model_best.pth.tar')
    state = torch.load(best, map_location='cpu', weights_only=False)['state_dict']
    loaded = timm.create_model(f'local-dir:{hf_dir}', pretrained=True).eval()
    assert list(loaded.pretrained_cfg['label_names']) == classes
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
