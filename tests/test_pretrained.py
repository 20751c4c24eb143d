"""Fine-tuning from timm's pretrained linear-head siblings: tags, loading routes, head from the linear head.

No downloads: the "pretrained" weights are state dicts of tiny stock models made here, loaded
through every route (pretrained_cfg_overlay, the Hugging Face cache offline, train.py flags).
"""
import contextlib
import logging
import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from timm.models.mlp_mixer import MlpMixer

import noah_mlp  # noqa: F401
from noah_mlp.models import NOAH_MODEL_ARGS
from noah_mlp.models.mlp_mixer import NoahMlpMixer
from noah_train_helpers import FAST, make_image_folder, run_cli

# 16 tokens, 2 blocks: a stock sibling and its NOAH twin in a fraction of a second
TINY = dict(img_size=32, patch_size=8, num_blocks=2)
SIBLINGS_WITH_WEIGHTS = sorted(n for n in NOAH_MODEL_ARGS if timm.list_pretrained(f'{n}.*'))


def stock(name: str, **kwargs) -> torch.nn.Module:
    """timm's linear-head `name` at a tiny size (timm's entrypoints fix patch size and depth: build its class)."""
    torch.manual_seed(0)
    model = MlpMixer(**dict(NOAH_MODEL_ARGS[name], **dict(TINY, **kwargs))).eval()
    with torch.no_grad():  # timm zero-initialises Mixer heads: give the linear head real values
        model.head.weight.normal_(0, 0.1)
        model.head.bias.normal_(0, 0.1)
    return model


def backbone(model: torch.nn.Module):
    return {k: v for k, v in model.state_dict().items() if not k.startswith('head.')}


def assert_same_backbone(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = backbone(a), backbone(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_siblings_with_published_weights_are_the_expected_ones():
    assert SIBLINGS_WITH_WEIGHTS == [
        'gmixer_24_224', 'gmlp_s16_224', 'mixer_b16_224', 'mixer_l16_224',
        'resmlp_12_224', 'resmlp_24_224', 'resmlp_36_224', 'resmlp_big_24_224']


@pytest.mark.parametrize('sibling', SIBLINGS_WITH_WEIGHTS)
def test_every_published_sibling_tag_has_a_noah_twin_on_the_same_weights(sibling):
    tags = [n.split('.', 1)[1] for n in timm.list_pretrained(f'{sibling}.*')]
    assert sorted(n.split('.', 1)[1] for n in timm.list_pretrained(f'noah_{sibling}.*')) == sorted(tags)
    for tag in tags:
        theirs, ours = get_pretrained_cfg(f'{sibling}.{tag}'), get_pretrained_cfg(f'noah_{sibling}.{tag}')
        assert ours.hf_hub_id == theirs.hf_hub_id == f'timm/{sibling}.{tag}'
        assert (ours.url, ours.num_classes, ours.mean, ours.std, ours.crop_pct, ours.interpolation) == (
            theirs.url, theirs.num_classes, theirs.mean, theirs.std, theirs.crop_pct, theirs.interpolation)
        assert ours.classifier == ('head.query', 'head.value')
    # `pretrained=True` without a tag takes the sibling's default weights
    assert get_pretrained_cfg(f'noah_{sibling}').tag == get_pretrained_cfg(sibling).tag


@contextlib.contextmanager
def model_log_lines():
    """Messages of the models' logger (set up directly: the CLIs' logging setup stops propagation to pytest)."""
    logger = logging.getLogger('noah_mlp.models.mlp_mixer')
    lines, level = [], logger.level
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize('num_classes', [1000, 7])
def test_stock_checkpoint_file_gives_the_backbone_and_a_fresh_noah_head(tmp_path, num_classes):
    source = stock('gmlp_s16_224')
    path = tmp_path / 'gmlp_s16_224.pth'
    torch.save(source.state_dict(), path)
    with model_log_lines() as lines:
        model = timm.create_model('noah_gmlp_s16_224', pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert_same_backbone(model, source)
    assert model.head.query.weight.shape[0] == 4 * num_classes
    assert torch.count_nonzero(model.head.value.bias) == 0 and model.head.value.weight.std() > 0
    lines = [line for line in lines if 'NOAH head' in line]
    assert len(lines) == 1 and 'starts fresh' in lines[0] and '1000 classes' in lines[0]


def test_resmlp_checkpoint_in_facebook_layout_is_remapped(tmp_path):
    """timm's own filter for old ResMLP layouts runs before the head is handled."""
    source = stock('resmlp_12_224')
    fb = {}
    for k, v in source.state_dict().items():
        k = k.replace('stem.', 'patch_embed.').replace('linear_tokens.', 'attn.').replace('mlp_channels.', 'mlp.')
        k = k.replace('ls1', 'gamma_1').replace('ls2', 'gamma_2')
        fb[k] = v.reshape(-1) if k.endswith(('.alpha', '.beta')) else v
    path = tmp_path / 'resmlp_fb.pth'
    torch.save(fb, path)
    model = timm.create_model('noah_resmlp_12_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **TINY)
    assert_same_backbone(model, source)


@pytest.mark.parametrize('head_split', [True, False])
@pytest.mark.parametrize('sibling', ['mixer_s16_224', 'gmlp_s16_224', 'resmlp_12_224'])
def test_noah_head_started_from_the_linear_head_gives_the_stock_logits(tmp_path, sibling, head_split):
    source = stock(sibling, num_classes=10)
    path = tmp_path / 'stock.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model(
        f'noah_{sibling}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        num_classes=10, kv_split=False, head_split=head_split, linear_head_init=True, **TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-5)
    assert torch.count_nonzero(model.head.query.weight) == 0  # uniform attention: it can learn from here


def test_init_head_from_linear_refuses_what_cannot_be_exact():
    source = stock('mixer_s16_224', num_classes=10)
    with pytest.raises(ValueError, match='kv_split=False'):
        timm.create_model('noah_mixer_s16_224', num_classes=10, **TINY).init_head_from_linear(
            source.head.weight, source.head.bias)
    with pytest.raises(ValueError, match=r'\(10, 512\).*\(4, 512\)'):
        timm.create_model('noah_mixer_s16_224', num_classes=4, kv_split=False, **TINY).init_head_from_linear(
            source.head.weight, source.head.bias)


def test_noah_checkpoint_still_loads_whole_as_pretrained(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model('noah_gmlp_s16_224', num_classes=10, **TINY).eval()
    path = tmp_path / 'noah.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model('noah_gmlp_s16_224', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def _hf_cache_with(root, repo_id: str, state_dict) -> str:
    """The Hugging Face hub cache layout: models--{org}--{name}/snapshots/{rev}/model.safetensors + refs/main."""
    repo = os.path.join(root, 'hub', 'models--' + repo_id.replace('/', '--'))
    rev = '0123456789abcdef0123456789abcdef01234567'
    os.makedirs(os.path.join(repo, 'snapshots', rev))
    os.makedirs(os.path.join(repo, 'refs'))
    with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
        f.write(rev)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(repo, 'snapshots', rev, 'model.safetensors'))
    return os.path.join(root, 'hub')


TRAIN_TINY = ['--model-kwargs', 'num_blocks=2', 'embed_dim=32', 'patch_size=4', '--img-size', '16']


def _tiny_stock_for_train(name: str):
    return stock(name, img_size=16, patch_size=4, embed_dim=32)


def _trained_backbone(out_dir: str):
    ckpt = torch.load(os.path.join(out_dir, 'last.pth.tar'), map_location='cpu', weights_only=False)
    return {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('head.')}


def _assert_backbone_is(trained, source):
    expected = backbone(source)
    assert trained.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(trained[k], expected[k], msg=k)


def test_train_pretrained_reads_the_hugging_face_cache_offline(tmp_path):
    """`train.py --pretrained` with HF_HUB_OFFLINE=1 finds the sibling's weights in the cache; an empty cache
    gives one error line naming what to download or pass instead."""
    data = make_image_folder(str(tmp_path / 'data'), size=16)
    source = _tiny_stock_for_train('gmlp_s16_224')
    hub = _hf_cache_with(str(tmp_path / 'hf'), 'timm/gmlp_s16_224.ra3_in1k', source.state_dict())
    args = [data, '--model', 'noah_gmlp_s16_224', '--pretrained', *TRAIN_TINY, *FAST, '--epochs', '1',
            '--lr', '0', '--output', str(tmp_path / 'out'), '--experiment', 'ft']
    res = run_cli('train.py', args, env={'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': hub, 'HF_HOME': str(tmp_path / 'hf')})
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'NOAH head (3 classes) starts fresh' in res.stdout
    _assert_backbone_is(_trained_backbone(str(tmp_path / 'out' / 'ft')), source)

    empty = str(tmp_path / 'empty')
    res = run_cli('train.py', args[:-2] + ['--experiment', 'offline'],
                  env={'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': empty, 'HF_HOME': empty})
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in res.stderr
    assert 'timm/gmlp_s16_224.ra3_in1k' in errors[0] and '--pretrained-path' in errors[0]


@pytest.mark.parametrize('flag', ['--pretrained-path', '--initial-checkpoint'])
def test_train_from_a_stock_timm_checkpoint_file(tmp_path, flag):
    data = make_image_folder(str(tmp_path / 'data'), size=16)
    source = _tiny_stock_for_train('mixer_s16_224')
    path = str(tmp_path / 'mixer_s16_224.pth')
    torch.save({'state_dict': source.state_dict(), 'epoch': 3}, path)  # a timm training checkpoint
    res = run_cli('train.py', [data, '--model', 'noah_mixer_s16_224', flag, path, '--num-classes', '1000',
                               *TRAIN_TINY, *FAST, '--epochs', '1', '--lr', '0',
                               '--output', str(tmp_path / 'out'), '--experiment', 'ft'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the checkpoint's linear head (1000 classes) is dropped" in res.stdout
    _assert_backbone_is(_trained_backbone(str(tmp_path / 'out' / 'ft')), source)


def test_train_pretrained_without_published_weights_is_one_error_line(tmp_path):
    data = make_image_folder(str(tmp_path / 'data'), size=16)
    res = run_cli('train.py', [data, '--model', 'noah_gmlp_ti16_224', '--pretrained', *TRAIN_TINY, *FAST,
                               '--output', str(tmp_path / 'out')])
    assert res.returncode == 2 and 'Traceback' not in res.stderr
    assert "error: no pretrained weights for 'noah_gmlp_ti16_224'" in res.stderr and '--pretrained-path' in res.stderr


def test_model_class_is_noah():
    assert isinstance(timm.create_model('noah_gmlp_s16_224', **TINY), NoahMlpMixer)
