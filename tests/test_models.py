"""Registered NOAH / baseline models: registry, parameter counts, timm conventions, checkpoints."""
import argparse

import pytest
import timm
import torch
import torch.nn as nn

import noah_mlp
from noah_mlp import NoahHead, NoahMlpMixer
from noah_mlp.models import BASELINE_MODEL_ARGS, NOAH_MODEL_ARGS

TIMM_MIXER_FAMILY = [
    'mixer_s32_224', 'mixer_s16_224', 'mixer_b32_224', 'mixer_b16_224', 'mixer_l32_224', 'mixer_l16_224',
    'gmixer_12_224', 'gmixer_24_224', 'resmlp_12_224', 'resmlp_24_224', 'resmlp_36_224', 'resmlp_big_24_224',
    'gmlp_ti16_224', 'gmlp_s16_224', 'gmlp_b16_224',
]
WIDTH_VARIANTS = ['mixer_s16_075_224', 'mixer_s16_050_224', 'gmlp_ti16_075_224', 'gmlp_ti16_050_224']
NOAH_MODELS = sorted(f'noah_{n}' for n in TIMM_MIXER_FAMILY + WIDTH_VARIANTS)

# seed table (M params), except gMLP-Ti x0.75 whose 3.91M does not follow from its architecture (see README.md, Models)
SEED_PARAMS = {
    'mixer_b16_224': (59.88, 59.88), 'mixer_s16_224': (18.53, 18.54),
    'mixer_s16_075_224': (10.75, 10.76), 'mixer_s16_050_224': (5.07, 5.08),
    'gmlp_s16_224': (19.42, 19.42), 'gmlp_ti16_224': (5.87, 5.87),
    'gmlp_ti16_075_224': (3.86, 3.87), 'gmlp_ti16_050_224': (2.41, 2.41),
}

# tiny versions for the cheap per-model checks: 32 px, 8 px patches (16 tokens), 2 blocks
TINY = dict(img_size=32, patch_size=8, num_blocks=2, num_classes=10)


def tiny(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **dict(TINY, **kwargs))


def count_params(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_registry_lists_every_noah_model_and_width_baseline():
    assert sorted(timm.list_models('noah_*', module='mlp_mixer')) == NOAH_MODELS
    for name in WIDTH_VARIANTS:
        assert timm.is_model(name)
    assert set(NOAH_MODEL_ARGS) == set(TIMM_MIXER_FAMILY + WIDTH_VARIANTS)
    assert set(BASELINE_MODEL_ARGS) == set(WIDTH_VARIANTS)


@pytest.mark.parametrize('name', sorted(SEED_PARAMS))
def test_parameter_counts_match_seed_table(name):
    baseline, noah = SEED_PARAMS[name]
    with torch.device('meta'):
        assert count_params(timm.create_model(name)) == pytest.approx(baseline, abs=0.01)
        assert count_params(timm.create_model(f'noah_{name}')) == pytest.approx(noah, abs=0.01)


@pytest.mark.parametrize('name', TIMM_MIXER_FAMILY)
def test_noah_twin_has_timm_backbone(name):
    """Same backbone keys and shapes as timm's own model; only the head differs."""
    with torch.device('meta'):
        ours = timm.create_model(f'noah_{name}').state_dict()
        theirs = timm.create_model(name).state_dict()
    backbone = {k: v.shape for k, v in theirs.items() if not k.startswith('head.')}
    assert {k: v.shape for k, v in ours.items() if not k.startswith('head.')} == backbone
    assert sorted(k for k in ours if k.startswith('head.')) == [
        'head.query.bias', 'head.query.weight', 'head.value.bias', 'head.value.weight']


@pytest.mark.parametrize('name', NOAH_MODELS)
def test_forward_backward_and_features(name):
    torch.manual_seed(0)
    model = tiny(name)
    assert isinstance(model, NoahMlpMixer)
    assert isinstance(model.get_classifier(), NoahHead)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters outside the graph: {missing}'

    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 16, model.num_features)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(tokens), model(x))


@pytest.mark.parametrize('name', NOAH_MODELS + WIDTH_VARIANTS)
def test_pretrained_cfg(name):
    """The NOAH release's data config, except for twins of siblings with published weights: those default
    to the sibling's weights and data config (tests/test_pretrained.py)."""
    cfg = timm.get_pretrained_cfg(name).to_dict()
    expected = ('head.query', 'head.value') if name.startswith('noah_') else 'head'
    assert cfg['classifier'] == expected
    assert cfg['input_size'] == (3, 224, 224)
    if cfg.get('hf_hub_id'):
        assert name.startswith('noah_') and cfg['hf_hub_id'].startswith(f'timm/{name[len("noah_"):]}.')
        return
    assert cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.5, 0.5, 0.5)
    assert cfg['interpolation'] == 'bicubic'
    assert cfg['crop_pct'] == 0.9
    model = tiny(name)
    assert model.pretrained_cfg['crop_pct'] == 0.9


def test_width_baselines_are_linear_head_mixers():
    model = tiny('gmlp_ti16_050_224')
    assert type(model) is timm.models.mlp_mixer.MlpMixer
    assert isinstance(model.head, nn.Linear) and model.embed_dim == 64


def test_every_architecture_default_is_overridable():
    model = timm.create_model(
        'noah_gmlp_ti16_224', embed_dim=64, num_blocks=3, patch_size=8, mlp_ratio=4, img_size=48,
        num_classes=7, in_chans=1)
    assert model.embed_dim == 64 and len(model.blocks) == 3
    assert model.stem.num_patches == 36
    assert model(torch.randn(1, 1, 48, 48)).shape == (1, 7)


def test_noah_and_timm_keyword_arguments_reach_their_layers():
    model = tiny('noah_mixer_s16_224', embed_dim=48, noah_head_num=2, key_ratio=0.25, head_drop_rate=0.3,
                 drop_rate=0.2, proj_drop_rate=0.05, drop_path_rate=0.1)
    head = model.head
    assert (head.num_heads, head.key_ratio, head.key_chs, head.value_chs, head.drop) == (2, 0.25, 12, 36, 0.3)
    assert model.head_drop.p == 0.2
    assert model.blocks[0].mlp_channels.drop1.p == 0.05
    assert model.blocks[0].drop_path.drop_prob == 0.1

    dense = tiny('noah_gmlp_ti16_224', head_split=False, kv_split=False)
    assert dense.head.query.weight.shape == (4 * 10, 128, 1, 1)
    assert dense(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_impossible_head_settings_name_the_numbers():
    with pytest.raises(ValueError, match=r'64 key and 64 value channels.*divisible by 3'):
        tiny('noah_gmlp_ti16_224', noah_head_num=3)


def test_head_initialisation_is_lecun_normal_with_zero_bias():
    torch.manual_seed(0)
    model = timm.create_model('noah_mixer_s16_224', num_classes=1000)
    for conv in (model.head.query, model.head.value):
        fan_in = conv.weight.shape[1]
        assert torch.count_nonzero(conv.bias) == 0
        assert conv.weight.std().item() == pytest.approx(fan_in ** -0.5, rel=0.05)


def test_reset_classifier_builds_a_new_noah_head():
    model = tiny('noah_gmlp_ti16_224')
    model.reset_classifier(5)
    assert isinstance(model.get_classifier(), NoahHead)
    assert model.num_classes == 5 and model.head.num_heads == 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)

    model.eval()
    model.reset_classifier(3)
    assert not model.head.training
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    assert tiny('noah_gmlp_ti16_224', num_classes=0)(torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_forward_intermediates_and_features_only():
    model = tiny('noah_mixer_s16_224').eval()
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    assert final.shape == (2, 16, 512) and len(inter) == 2 and inter[0].shape == (2, 512, 4, 4)
    torch.testing.assert_close(final, model.forward_features(x))

    features = timm.create_model('noah_gmlp_ti16_224', features_only=True, out_indices=(0, 1), **TINY)
    maps = features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 128, 4, 4), (2, 128, 4, 4)]


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny('noah_gmlp_ti16_224', head_drop_rate=0.)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def _timm_training_checkpoint(model: nn.Module) -> dict:
    """A checkpoint shaped like the ones timm's train.py (and so upstream NOAH) writes."""
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    return {
        'epoch': 299, 'arch': 'noah_gmlp_ti16_224', 'version': 2, 'metric': 73.39,
        'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},  # saved from DDP
        'state_dict_ema': ema,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-5, 'params': [0]}]},
        'args': argparse.Namespace(model='noah_gmlp_ti16_224', lr=7e-4, drop=0.02333),
    }


def test_create_model_loads_timm_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = tiny('noah_gmlp_ti16_224')
    path = tmp_path / 'model_best.pth.tar'
    torch.save(_timm_training_checkpoint(trained), path)

    # timm's loader prefers the EMA weights when a checkpoint has them
    loaded = tiny('noah_gmlp_ti16_224', checkpoint_path=str(path))
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v + 1, msg=k)

    raw = tiny('noah_gmlp_ti16_224')
    timm.models.load_checkpoint(raw, str(path), use_ema=False)  # the DDP 'module.' prefix is stripped
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(raw.state_dict()[k], v, msg=k)


def test_create_model_loads_bare_state_dict_strictly(tmp_path):
    torch.manual_seed(0)
    trained = tiny('noah_mixer_s16_224')
    path = tmp_path / 'bare.pth'
    torch.save(trained.state_dict(), path)
    loaded = tiny('noah_mixer_s16_224', checkpoint_path=str(path))
    torch.testing.assert_close(loaded.head.value.weight, trained.head.value.weight)

    wrong = tiny('noah_mixer_s16_224', noah_head_num=2)
    with pytest.raises(RuntimeError, match='head.query.weight'):
        timm.models.load_checkpoint(wrong, str(path))


def test_upstream_layout_loads_with_strict_true():
    """A state dict laid out as docs/checkpoints.md's table (grouped 1x1 conv head) loads strictly."""
    torch.manual_seed(0)
    N, K, C = 4, 10, 128
    model = tiny('noah_gmlp_ti16_224')
    upstream = {k: torch.randn_like(v) for k, v in model.state_dict().items() if not k.startswith('head.')}
    upstream.update({
        'head.query.weight': torch.randn(N * K, C // 2 // N, 1, 1), 'head.query.bias': torch.randn(N * K),
        'head.value.weight': torch.randn(N * K, C // 2 // N, 1, 1), 'head.value.bias': torch.randn(N * K),
    })
    model.load_state_dict(upstream, strict=True)
    torch.testing.assert_close(model.head.value.bias, upstream['head.value.bias'])


def test_pretrained_file_with_other_num_classes_keeps_backbone_and_starts_fresh_head(tmp_path):
    torch.manual_seed(0)
    source = tiny('noah_gmlp_ti16_224')
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model(
        'noah_gmlp_ti16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        **dict(TINY, num_classes=5))
    torch.testing.assert_close(model.stem.proj.weight, source.stem.proj.weight)
    torch.testing.assert_close(model.blocks[1].mlp_channels.fc2.weight, source.blocks[1].mlp_channels.fc2.weight)
    assert model.head.query.weight.shape == (4 * 5, 16, 1, 1)
    assert torch.count_nonzero(model.head.value.bias) == 0

    same = timm.create_model(  # same number of classes as the file: its head is kept
        'noah_gmlp_ti16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY)
    torch.testing.assert_close(same.head.query.weight, source.head.query.weight)


def test_package_exports():
    assert noah_mlp.NoahHead is NoahHead
    assert noah_mlp.__version__
    assert noah_mlp.attention_maps is noah_mlp.attention.attention_maps


def test_readme_model_table_matches_built_models():
    """The README's model table is the front door: every row must be what the package builds."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    rows = re.findall(r'^\| `(noah_\w+)` \| ([\d.]+)M \| `(\w+)` \([^)]*\) \| ([\d.]+)M \|$', readme, re.M)
    assert sorted(r[0] for r in rows) == NOAH_MODELS
    for noah_name, noah_m, base_name, base_m in rows:
        assert noah_name == f'noah_{base_name}'
        with torch.device('meta'):
            assert f'{count_params(timm.create_model(noah_name)):.2f}' == noah_m, noah_name
            assert f'{count_params(timm.create_model(base_name)):.2f}' == base_m, base_name
