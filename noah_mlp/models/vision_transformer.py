"""NOAH DeiTs: timm's VisionTransformer without a class token, NOAH over the patch tokens.

As in the NOAH authors' DeiT, `noah_deit_*` have no class token (`class_token=False`; the position
embedding covers the patches only) and the head (N=4, r=1/2, value dropout 0.1) attends over the
final-normed patch tokens. Also registered: the authors' width-scaled DeiT-Tiny x0.75 / x0.5 (embed 144 /
96, 3 heads), as linear-head baselines (`deit_tiny_075_patch16_224`, `deit_tiny_050_patch16_224`) and NOAH
twins.

The authors' code maps tokens narrower than 192 channels through a Linear + Tanh to 192 before the head;
their published parameter counts (3.30M / 1.54M) are those of the head on the narrow tokens directly,
which is what the x0.75 / x0.5 twins build. `noah_hidden_size=192` builds the code's variant, whose
checkpoints (`pre_logits.fc.*`) then load. Pretrained tags start from timm's DeiT weights: the class
token and its position embedding are dropped, the backbone kept, the NOAH head fresh.
"""
from typing import Any, Dict

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer, checkpoint_filter_fn

from ..errors import UserError
from ._twins import NOAH_PAPER, build_noah_twin, layout_filter, sibling_cfgs

__all__ = ['NOAH_DEIT_ARGS', 'DEIT_BASELINE_ARGS', 'noah_deit_filter']

_DEIT = dict(patch_size=16, depth=12, mlp_ratio=4, qkv_bias=True)
DEIT_BASELINE_ARGS: Dict[str, Dict[str, Any]] = {
    'deit_tiny_075_patch16_224': dict(_DEIT, embed_dim=144, num_heads=3),
    'deit_tiny_050_patch16_224': dict(_DEIT, embed_dim=96, num_heads=3),
}
NOAH_DEIT_ARGS: Dict[str, Dict[str, Any]] = {
    'deit_tiny_patch16_224': dict(_DEIT, embed_dim=192, num_heads=3),
    'deit_small_patch16_224': dict(_DEIT, embed_dim=384, num_heads=6),
    'deit_base_patch16_224': dict(_DEIT, embed_dim=768, num_heads=12),
    **DEIT_BASELINE_ARGS,
}
_NO_CLASS_TOKEN = dict(class_token=False, global_pool='avg', fc_norm=False)
_NOAH_ARGS = dict(noah_head_num=4, key_ratio=1 / 2, head_drop_rate=0.1)

_CFG = dict(
    url='', num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9, interpolation='bicubic',
    fixed_input_size=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    first_conv='patch_embed.proj', classifier='head', license='apache-2.0')

default_cfgs = generate_default_cfgs({
    **{name: cfg for sibling in NOAH_DEIT_ARGS if sibling not in DEIT_BASELINE_ARGS
       for name, cfg in sibling_cfgs(f'noah_{sibling}', sibling, paper_ids=NOAH_PAPER).items()},
    **{f'noah_{name}': dict(_CFG, paper_ids=NOAH_PAPER) for name in DEIT_BASELINE_ARGS},
    **{name: dict(_CFG) for name in DEIT_BASELINE_ARGS},
})


@layout_filter(VisionTransformer)
def noah_deit_filter(state_dict: Dict[str, torch.Tensor], model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Map a DeiT checkpoint to a NOAH DeiT: timm's DeiT weights or the NOAH authors' layout.

    A class token (and its row of the position embedding) that the model does not have is dropped; the
    authors' `pre_logits.fc.*` (Linear + Tanh to 192 channels) becomes `noah_pre_logits.fc.*`.
    """
    out = dict(state_dict)
    if 'cls_token' in out and getattr(model, 'cls_token', None) is None:
        out.pop('cls_token')
        if 'pos_embed' in out and out['pos_embed'].shape[1] == model.pos_embed.shape[1] + 1:
            out['pos_embed'] = out['pos_embed'][:, 1:]
    hidden = {k: out.pop(k) for k in [k for k in out if k.startswith('pre_logits.')]}
    if hidden and getattr(model, 'noah_pre_logits', None) is None:
        weight = hidden.get('pre_logits.fc.weight', next(iter(hidden.values())))
        raise UserError(
            'this checkpoint maps the tokens through a Linear + Tanh before the NOAH head (pre_logits.fc, '
            f'{tuple(weight.shape)}): create the model with noah_hidden_size={weight.shape[0]} '
            "(the NOAH authors' code builds that layer for DeiTs narrower than 192 channels).")
    out = checkpoint_filter_fn(out, model)  # timm's own filter drops any `pre_logits` it sees
    out.update({'noah_' + k: v for k, v in hidden.items()})
    return out


def _create_baseline(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    return _create_vision_transformer(variant, pretrained, **dict(DEIT_BASELINE_ARGS[variant], **kwargs))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    args = dict(NOAH_DEIT_ARGS[variant[len('noah_'):]], **_NO_CLASS_TOKEN)
    return build_noah_twin(
        _create_vision_transformer, variant, pretrained, _NOAH_ARGS, arch_args=args, **kwargs)


@register_model
def deit_tiny_075_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny x0.75 width (embed 144, 3 heads), linear head: the NOAH authors' baseline (3.29M)."""
    return _create_baseline('deit_tiny_075_patch16_224', pretrained, **kwargs)


@register_model
def deit_tiny_050_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny x0.5 width (embed 96, 3 heads), linear head: the NOAH authors' baseline (1.53M)."""
    return _create_baseline('deit_tiny_050_patch16_224', pretrained, **kwargs)


@register_model
def noah_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny without class token, NOAH head (N=4, r=1/2; published 5.72M params, 74.29% top-1)."""
    return _create('noah_deit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def noah_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Small without class token, NOAH head (N=4, r=1/2; published 22.06M params, 80.56% top-1)."""
    return _create('noah_deit_small_patch16_224', pretrained, **kwargs)


@register_model
def noah_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Base without class token, NOAH head (N=4, r=1/2; 86.57M params, published 86.86M; 82.22% top-1)."""
    return _create('noah_deit_base_patch16_224', pretrained, **kwargs)


@register_model
def noah_deit_tiny_075_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny x0.75 without class token, NOAH head (N=4, r=1/2; published 3.30M params, 66.64% top-1)."""
    return _create('noah_deit_tiny_075_patch16_224', pretrained, **kwargs)


@register_model
def noah_deit_tiny_050_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny x0.5 without class token, NOAH head (N=4, r=1/2; published 1.54M params, 56.66% top-1)."""
    return _create('noah_deit_tiny_050_patch16_224', pretrained, **kwargs)
