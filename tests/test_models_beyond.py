"""The NOAH authors' CNN and DeiT rows: registry, published settings and parameter counts, weights."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import noah_mlp  # noqa: F401  (registers the models)
from noah_mlp.errors import UserError

# published rows (M params baseline / + NOAH, N, r); the rows whose counts differ are in docs/beyond_mlps.md
PUBLISHED = {
    'resnet18': (11.69, 11.70, 4, 1 / 2), 'resnet50': (25.56, 25.56, 4, 1 / 8),
    'resnet101': (44.55, 44.56, 4, 1 / 8), 'resnet152': (60.19, 60.20, 4, 1 / 8),
    'mobilenetv2_100': (3.50, 3.52, 8, 1 / 4), 'mobilenetv2_075': (2.64, 2.65, 8, 1 / 4),
    'mobilenetv2_050': (1.97, 1.98, 8, 1 / 4), 'mobilenetv2_035': (1.68, 1.69, 8, 1 / 4),
    'deit_tiny_patch16_224': (5.72, 5.72, 4, 1 / 2),
    'deit_tiny_075_patch16_224': (3.29, 3.30, 4, 1 / 2), 'deit_tiny_050_patch16_224': (1.53, 1.54, 4, 1 / 2),
}
# rows whose architecture in timm is not the one the NOAH authors counted: what timm builds instead
DIFFERENT = {
    'mobilenetv3_small_100': (2.54, 2.56, 8, 1 / 4),  # published 2.94 / 2.95: the authors' own MobileNetV3-Small
    'deit_small_patch16_224': (22.05, 22.06, 4, 1 / 2),  # published baseline 22.06
    'deit_base_patch16_224': (86.57, 86.57, 4, 1 / 2),  # published 86.86 / 86.86
}
BEYOND = sorted(f'noah_{n}' for n in {**PUBLISHED, **DIFFERENT})


def count(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_registry_lists_the_cnn_and_deit_rows():
    listed = set(timm.list_models('noah_*')) - set(timm.list_models('noah_*', module='mlp_mixer'))
    assert sorted(listed) == BEYOND
    assert timm.is_model('deit_tiny_075_patch16_224') and timm.is_model('deit_tiny_050_patch16_224')
    # each family is listed where timm lists its stock models (timm registers mobilenetv2_* in efficientnet)
    widths = ('035', '050', '075', '100')
    assert timm.list_models('noah_*', module='efficientnet') == [f'noah_mobilenetv2_{w}' for w in widths]
    assert timm.list_models('noah_*', module='resnet') == [f'noah_resnet{d}' for d in (18, 50, 101, 152)]
    assert timm.list_models('noah_*', module='mobilenetv3') == ['noah_mobilenetv3_small_100']
    assert len(timm.list_models('noah_deit_*', module='vision_transformer')) == 5


@pytest.mark.parametrize('name', sorted({**PUBLISHED, **DIFFERENT}))
def test_parameter_counts_and_head_settings(name):
    baseline, noah, heads, ratio = {**PUBLISHED, **DIFFERENT}[name]
    with torch.device('meta'):
        stock, model = timm.create_model(name), timm.create_model(f'noah_{name}')
    assert count(stock) == pytest.approx(baseline, abs=0.005)
    assert count(model) == pytest.approx(noah, abs=0.005)
    assert (model.noah_head.num_heads, model.noah_head.key_ratio) == (heads, ratio)
    # the backbone is timm's: same keys and shapes except the classifier
    own = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(model.noah_classifier + '.')}
    theirs = {k: v.shape for k, v in stock.state_dict().items() if not k.startswith(model.noah_classifier + '.')}
    if name.startswith('deit'):  # no class token: one position fewer
        theirs.pop('cls_token')
        theirs['pos_embed'] = torch.Size([1, theirs['pos_embed'][1] - 1, theirs['pos_embed'][2]])
    assert own == theirs


def test_pretrained_tags_point_at_the_siblings_weights():
    assert timm.list_pretrained('noah_resnet50.*') == [f'noah_{n}' for n in timm.list_pretrained('resnet50.*')]
    cfg = timm.models.get_pretrained_cfg('noah_deit_small_patch16_224')
    assert cfg.hf_hub_id == timm.models.get_pretrained_cfg('deit_small_patch16_224').hf_hub_id


def _save(state_dict, path):
    torch.save(state_dict, path)
    return dict(file=str(path))


def test_sibling_weights_load_the_backbone_and_start_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    stock = timm.create_model('resnet18').eval()
    model = timm.create_model('noah_resnet18', pretrained=True,
                              pretrained_cfg_overlay=_save(stock.state_dict(), tmp_path / 'r18.pth')).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), stock.forward_features(x))
    assert model.noah_head.num_classes == 1000
    tuned = timm.create_model('noah_resnet18', pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'r18.pth')))
    assert tuned.noah_head.num_classes == 5 and torch.equal(tuned.conv1.weight, stock.conv1.weight)


def test_deit_weights_with_a_class_token_load_without_it(tmp_path):
    tiny = dict(img_size=32, depth=1)
    stock = timm.create_model('deit_tiny_patch16_224', **tiny)
    model = timm.create_model('noah_deit_tiny_patch16_224', pretrained=True, **tiny,
                              pretrained_cfg_overlay=_save(stock.state_dict(), tmp_path / 'deit.pth'))
    assert getattr(model, 'cls_token', None) is None
    torch.testing.assert_close(model.pos_embed, stock.pos_embed[:, 1:])
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, stock.blocks[0].attn.qkv.weight)


# --- the NOAH authors' checkpoint layouts, rebuilt here from their model definitions -------------------

class AuthorsNoah(nn.Module):
    """The authors' head: grouped 1x1 convolutions `query` / `value` over the flattened map (B, C, 1, L)."""

    def __init__(self, channels, classes, heads, ratio):
        super().__init__()
        self.heads, self.keys = heads, int(channels * ratio)
        self.query = nn.Conv2d(self.keys, heads * classes, 1, groups=heads)
        self.value = nn.Conv2d(channels - self.keys, heads * classes, 1, groups=heads)

    def forward(self, x):  # x: (B, C, H, W) or tokens (B, C, L, 1)
        x = x.flatten(2).unsqueeze(2)
        B, _, _, L = x.shape
        a = self.query(x[:, :self.keys]).reshape(B, self.heads, -1, L).softmax(dim=3)
        v = self.value(x[:, self.keys:]).reshape(B, self.heads, -1, L)
        return (a * v).sum(dim=(1, 3))


def _randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if 'running_var' in name else torch.randn_like(t) * 0.1)
    return model.eval()


class AuthorsResNet(nn.Module):
    """torchvision's ResNet layers (the authors' key names) with their NOAH head named `head`."""

    def __init__(self, classes):
        super().__init__()
        tv = torchvision.models.resnet18()
        for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4'):
            setattr(self, name, getattr(tv, name))
        self.head = AuthorsNoah(512, classes, 4, 1 / 2)

    def forward(self, x):
        for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4', 'head'):
            x = getattr(self, name)(x)
        return x


class AuthorsMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 `features` (the authors' layout) with their NOAH head named `head`."""

    def __init__(self, width, classes):
        super().__init__()
        self.features = torchvision.models.mobilenet_v2(width_mult=width).features
        self.head = AuthorsNoah(1280, classes, 8, 1 / 4)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize('name, reference', [
    ('noah_resnet18', lambda: AuthorsResNet(10)),
    ('noah_mobilenetv2_035', lambda: AuthorsMobileNetV2(0.35, 10)),
    ('noah_mobilenetv2_100', lambda: AuthorsMobileNetV2(1.0, 10)),
])
def test_authors_cnn_checkpoints_load_with_equal_logits(name, reference, tmp_path):
    ref = _randomise(reference())
    path = tmp_path / 'authors.pth.tar'
    torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in ref.state_dict().items()},
                'best_acc': 1.0}, path)
    model = timm.create_model(name, num_classes=10, checkpoint_path=None, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


class AuthorsDeiT(nn.Module):
    """The authors' NOAH DeiT: no class token, final norm, optional Linear + Tanh to 192, NOAH over tokens."""

    def __init__(self, embed_dim, hidden, classes):
        super().__init__()
        vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, embed_dim=embed_dim, num_heads=3,
                                class_token=False, global_pool='avg', fc_norm=False, num_classes=0)
        self.patch_embed, self.pos_embed, self.blocks, self.norm = vit.patch_embed, vit.pos_embed, vit.blocks, vit.norm
        self.pre_logits = nn.Sequential() if not hidden else nn.Sequential()
        if hidden:
            self.pre_logits.add_module('fc', nn.Linear(embed_dim, hidden))
            self.pre_logits.add_module('act', nn.Tanh())
        self.head = AuthorsNoah(hidden or embed_dim, classes, 4, 1 / 2)

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed
        x = self.norm(self.blocks(x))
        x = self.pre_logits(x)
        return self.head(x.transpose(1, 2))


@pytest.mark.parametrize('name, embed, hidden', [
    ('noah_deit_tiny_patch16_224', 192, None),
    ('noah_deit_tiny_050_patch16_224', 96, 192),
])
def test_authors_deit_checkpoints_load_with_equal_logits(name, embed, hidden, tmp_path):
    ref = _randomise(AuthorsDeiT(embed, hidden, 10))
    path = tmp_path / 'deit.pth'
    torch.save({'model': ref.state_dict()}, path)
    tiny = dict(img_size=32, depth=2, num_classes=10)
    extra = dict(noah_hidden_size=hidden) if hidden else {}
    model = timm.create_model(name, pretrained=True, **tiny, **extra,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    if hidden:
        with pytest.raises(UserError, match=f'noah_hidden_size={hidden}'):
            timm.create_model(name, pretrained=True, **tiny,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))


def _authors_resnet_file(tmp_path, classes):
    ref = _randomise(AuthorsResNet(classes))
    path = str(tmp_path / 'authors_resnet.pth.tar')
    torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in ref.state_dict().items()}}, path)
    return ref, path


def _authors_deit_file(tmp_path, embed, hidden, classes):
    ref = _randomise(AuthorsDeiT(embed, hidden, classes))
    path = str(tmp_path / 'authors_deit.pth')
    torch.save({'model': ref.state_dict()}, path)
    return ref, path


@pytest.mark.parametrize('name', ['noah_resnet18', 'noah_deit_tiny_050_patch16_224'])
def test_authors_checkpoints_load_as_initial_checkpoint_and_for_validation(name, tmp_path):
    """train.py's --initial-checkpoint and validate.py's --checkpoint remap the authors' layouts as the
    pretrained route does (one `remap_checkpoint`): equal logits through both."""
    from argparse import Namespace
    from noah_mlp.checkpoint import safe_load
    from noah_mlp.cli_common import load_initial_weights
    from noah_mlp.validate import _load_checkpoint_weights
    if name == 'noah_resnet18':
        (ref, path), kwargs, size = _authors_resnet_file(tmp_path, 10), dict(num_classes=10), 64
    else:
        (ref, path), size = _authors_deit_file(tmp_path, 96, 192, 10), 32
        kwargs = dict(img_size=32, depth=2, num_classes=10, noah_hidden_size=192)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = ref(x)
    started = timm.create_model(name, **kwargs)
    load_initial_weights(started, path, name)
    evaluated = timm.create_model(name, **kwargs)
    _load_checkpoint_weights(evaluated, safe_load(path), Namespace(use_ema=False, checkpoint=path, model=name))
    with torch.no_grad():
        torch.testing.assert_close(started.eval()(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(evaluated.eval()(x), expected, rtol=1e-4, atol=1e-4)


def test_validate_cli_evaluates_an_authors_resnet_checkpoint(tmp_path):
    """End to end: validate.py --model noah_resnet18 --checkpoint <the authors' file> scores the file's
    model: its top-1 is the reference model's on the same preprocessed images."""
    import json
    from timm.data import create_dataset, create_transform, resolve_data_config
    from noah_mlp import validate as validate_mod
    from noah_train_helpers import make_image_folder
    ref, path = _authors_resnet_file(tmp_path, 3)
    data = make_image_folder(str(tmp_path / 'data'), classes=3, train_per_class=1, val_per_class=4, size=64)
    results = str(tmp_path / 'r.json')
    assert validate_mod.main([data, '--model', 'noah_resnet18', '--checkpoint', path, '--num-classes', '3',
                              '--img-size', '64', '--workers', '0', '--results-file', results]) == 0
    top1 = json.load(open(results))['top1']
    model = timm.create_model('noah_resnet18', num_classes=3)
    config = resolve_data_config({'input_size': (3, 64, 64)}, model=model)
    dataset = create_dataset('', root=data, split='validation', transform=create_transform(**config))
    with torch.no_grad():
        images = torch.stack([img for img, _ in dataset])
        labels = torch.tensor([label for _, label in dataset])
        expected = 100. * (ref(images).argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(expected, abs=1e-3)
