"""NOAH MobileNetV2s: timm's MobileNetV2 (registered by timm in `efficientnet`) with a NOAH head.

`noah_mobilenetv2_{100,075,050,035}`: NOAH over the 1280-channel final map (N=8, r=1/4, value dropout
0.2 as published). timm's MobileNetV2 is the NOAH authors' architecture (1280 head channels at every
width below 1.0), so their checkpoints load after a key remapping (`authors_mobilenetv2_filter`).
`noah_mobilenetv2_100` starts from timm's published `mobilenetv2_100` weights; the narrower widths have
no timm weights (timm registers only `mobilenetv2_050`, whose weights they start from where they exist).
"""
from typing import Any, Dict, List

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet, _gen_mobilenet_v2

from ._twins import NOAH_PAPER, build_noah_twin, layout_filter, sibling_cfgs

__all__ = ['NOAH_MOBILENETV2_ARGS', 'authors_mobilenetv2_filter']

NOAH_MOBILENETV2_ARGS: Dict[str, float] = {
    'mobilenetv2_100': 1.0, 'mobilenetv2_075': 0.75, 'mobilenetv2_050': 0.5, 'mobilenetv2_035': 0.35,
}
_NOAH_ARGS = dict(noah_head_num=8, key_ratio=1 / 4, head_drop_rate=0.2)


default_cfgs = generate_default_cfgs({
    name: cfg
    for sibling in NOAH_MOBILENETV2_ARGS
    for name, cfg in sibling_cfgs(f'noah_{sibling}', sibling, paper_ids=NOAH_PAPER).items()
})


def _authors_block_names(model: EfficientNet) -> List[List[str]]:
    """timm's parameter-owning module names of each of the NOAH authors' `features.{i}` entries, in order."""
    names = [['conv_stem', 'bn1']]
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            prefix = f'blocks.{s}.{b}'
            if hasattr(block, 'conv_pwl'):  # inverted residual: expand, depthwise, project
                names.append([f'{prefix}.{m}' for m in ('conv_pw', 'bn1', 'conv_dw', 'bn2', 'conv_pwl', 'bn3')])
            else:  # first block, expansion 1: depthwise, project
                names.append([f'{prefix}.{m}' for m in ('conv_dw', 'bn1', 'conv_pw', 'bn2')])
    names.append(['conv_head', 'bn2'])
    return names


@layout_filter(EfficientNet)
def authors_mobilenetv2_filter(state_dict: Dict[str, torch.Tensor], model: EfficientNet) -> Dict[str, torch.Tensor]:
    """Rename a NOAH authors' MobileNetV2 checkpoint (`features.*`, `head.*`) to timm's names.

    Their `features.0` and the last entry are conv + BN (+ ReLU6) blocks whose parameters sit at `.0` / `.1`;
    each inverted residual keeps its layers in `conv`, a sequence of conv+BN blocks (`conv.{j}.0/1`) followed
    by the projecting conv and its BN. Modules are matched in order: the same architecture, other names.
    """
    if not any(k.startswith('features.') for k in state_dict):
        return state_dict
    targets = _authors_block_names(model)
    out = {}
    for key, value in state_dict.items():
        if key.startswith('head.'):
            out['classifier.' + key[len('head.'):]] = value
            continue
        parts = key.split('.')
        index = int(parts[1])
        if index == 0 or index == len(targets) - 1:
            module = targets[index][int(parts[2])]  # ConvBNReLU: .0 conv, .1 bn
            rest = parts[3:]
        else:
            # conv.{j}.{0|1} for the conv+BN blocks, conv.{j} for the projecting conv / BN
            j = int(parts[3])
            inner = parts[4:]
            if len(targets[index]) == 6:  # expand (conv.0), depthwise (conv.1), project (conv.2, conv.3)
                position = {0: 0, 1: 2, 2: 4, 3: 5}[j]
            else:  # depthwise (conv.0), project (conv.1, conv.2)
                position = {0: 0, 1: 2, 2: 3}[j]
            if j <= (1 if len(targets[index]) == 6 else 0):
                position += int(inner[0])
                inner = inner[1:]
            module = targets[index][position]
            rest = inner
        out['.'.join([module] + rest)] = value
    return out


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    multiplier = NOAH_MOBILENETV2_ARGS[variant[len('noah_'):]]

    def build(name, pretrained=False, **kw):
        return _gen_mobilenet_v2(name, multiplier, pretrained=pretrained, **kw)

    return build_noah_twin(build, variant, pretrained, _NOAH_ARGS, **kwargs)


@register_model
def noah_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """MobileNetV2 1.0x with a NOAH head (N=8, r=1/4; published 3.52M params, 73.35% top-1)."""
    return _create('noah_mobilenetv2_100', pretrained, **kwargs)


@register_model
def noah_mobilenetv2_075(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """MobileNetV2 0.75x with a NOAH head (N=8, r=1/4; published 2.65M params, 71.44% top-1)."""
    return _create('noah_mobilenetv2_075', pretrained, **kwargs)


@register_model
def noah_mobilenetv2_050(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """MobileNetV2 0.5x with a NOAH head (N=8, r=1/4; published 1.98M params, 67.44% top-1)."""
    return _create('noah_mobilenetv2_050', pretrained, **kwargs)


@register_model
def noah_mobilenetv2_035(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """MobileNetV2 0.35x with a NOAH head (N=8, r=1/4; published 1.69M params, 63.40% top-1)."""
    return _create('noah_mobilenetv2_035', pretrained, **kwargs)
