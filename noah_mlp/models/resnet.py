"""NOAH ResNets: timm's ResNet with a NOAH head over the final 7x7 map (the NOAH authors' CNN rows).

`noah_resnet{18,50,101,152}` use the published head settings (N=4; r=1/2 for ResNet-18, 1/8 for the
bottleneck ResNets; value dropout 0.1). Their pretrained tags are timm's `resnet*` tags: the backbone
loads the sibling's published weights and the NOAH head starts fresh. Checkpoints of the NOAH authors'
ResNets (torchvision key names, head at `head.query` / `head.value`) load as they are: the head moves
to timm's `fc`.
"""
from typing import Any, Dict

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, _create_resnet

from ._twins import NOAH_PAPER, build_noah_twin, layout_filter, sibling_cfgs

__all__ = ['NOAH_RESNET_ARGS']

# (block, layers, published N, published r)
NOAH_RESNET_ARGS: Dict[str, Dict[str, Any]] = {
    'resnet18': dict(block=BasicBlock, layers=(2, 2, 2, 2), noah_head_num=4, key_ratio=1 / 2),
    'resnet50': dict(block=Bottleneck, layers=(3, 4, 6, 3), noah_head_num=4, key_ratio=1 / 8),
    'resnet101': dict(block=Bottleneck, layers=(3, 4, 23, 3), noah_head_num=4, key_ratio=1 / 8),
    'resnet152': dict(block=Bottleneck, layers=(3, 8, 36, 3), noah_head_num=4, key_ratio=1 / 8),
}


@layout_filter(ResNet)
def authors_resnet_filter(state_dict: Dict[str, torch.Tensor], model: ResNet) -> Dict[str, torch.Tensor]:
    """The NOAH authors' ResNet checkpoints name the head `head.*`; timm's ResNet calls its classifier `fc`."""
    return {('fc.' + k[len('head.'):] if k.startswith('head.') else k): v for k, v in state_dict.items()}


default_cfgs = generate_default_cfgs({
    name: cfg
    for sibling in NOAH_RESNET_ARGS
    for name, cfg in sibling_cfgs(f'noah_{sibling}', sibling, paper_ids=NOAH_PAPER).items()
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    args = dict(NOAH_RESNET_ARGS[variant[len('noah_'):]])
    noah_args = {k: args.pop(k) for k in ('noah_head_num', 'key_ratio')}
    return build_noah_twin(
        _create_resnet, variant, pretrained, noah_args, arch_args=args, **kwargs)


@register_model
def noah_resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with a NOAH head (N=4, r=1/2; published 11.70M params, 71.81% top-1)."""
    return _create('noah_resnet18', pretrained, **kwargs)


@register_model
def noah_resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 with a NOAH head (N=4, r=1/8; published 25.56M params, 77.25% top-1)."""
    return _create('noah_resnet50', pretrained, **kwargs)


@register_model
def noah_resnet101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-101 with a NOAH head (N=4, r=1/8; published 44.56M params, 78.22% top-1)."""
    return _create('noah_resnet101', pretrained, **kwargs)


@register_model
def noah_resnet152(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-152 with a NOAH head (N=4, r=1/8; published 60.20M params, 78.57% top-1)."""
    return _create('noah_resnet152', pretrained, **kwargs)
