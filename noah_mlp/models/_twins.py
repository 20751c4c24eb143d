"""Building the NOAH twin of a timm CNN / ViT: timm's own builder, then a NOAH head, then the weights.

A twin is built by the family's own timm generator (so every architecture argument means what it means
in timm) without weights, turned into the family class's NOAH subclass (`noah_mlp.adapt.noah_class`), and
only then loaded: weights that hold a NOAH head (this package's, or the NOAH authors' after the family's
key remapping) load exactly; the linear-head sibling's published weights load the backbone and start a
fresh NOAH head.
"""
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg, load_pretrained
from timm.models._registry import get_arch_pretrained_cfgs
from timm.models.mlp_mixer import MlpMixer

from ..adapt import HEAD_ARGS, is_noah_adapted, noah_class, noah_head_filter

__all__ = ['build_noah_twin', 'layout_filter', 'remap_checkpoint', 'sibling_cfgs']

FilterFn = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]

NOAH_PAPER = 'NOAH: Learning Pairwise Object Category Attentions for Image Classification'


# What a sibling's pretrained cfg says about its weights: where they are and how they were trained.
WEIGHT_CFG_KEYS = (
    'hf_hub_id', 'hf_hub_filename', 'url', 'num_classes', 'input_size', 'interpolation', 'crop_pct', 'crop_mode',
    'mean', 'std', 'license')


def sibling_cfgs(
        variant: str,
        sibling: str,
        base: Optional[Dict[str, Any]] = None,
        note: str = '',
        **overrides: Any,
) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs `{variant}.{tag}` for every weight tag timm publishes for `sibling` (default tag first).

    Each points at the sibling's weights (same hub id / url); the NOAH head starts fresh on loading.
    `base` is the twin's own cfg, which takes the sibling's `WEIGHT_CFG_KEYS`; without one the twin takes
    the sibling's whole cfg. Read from timm's registry, so the twins follow the installed timm's tags.
    Without published weights, one untagged cfg: `base` (or the sibling's cfg without weights) plus `overrides`.
    """
    out = {}
    first = None
    for name in get_arch_pretrained_cfgs(sibling):  # timm's order: the default tag first
        pretrained = get_pretrained_cfg(name)
        source = {k: v for k, v in pretrained.to_dict().items() if k not in ('architecture', 'tag')}
        first = first or source
        if not pretrained.has_weights:
            continue
        cfg = source if base is None else dict(base, **{
            k: source[k] for k in WEIGHT_CFG_KEYS if source.get(k) is not None})
        cfg['notes'] = (f'backbone: {name} (timm); the NOAH head starts fresh{note}',)
        out[f'{variant}.{name.split(".", 1)[1]}'] = dict(cfg, **overrides)
    if not out:
        out[variant] = dict((first or {}) if base is None else base, **overrides)
    return out


_LAYOUT_FILTERS: Dict[type, FilterFn] = {}


def layout_filter(timm_class: type) -> Callable[[FilterFn], FilterFn]:
    """Register `fn(state_dict, model)` as the map from other checkpoint layouts (the NOAH authors', older
    timm ones) to the key names of `timm_class`'s NOAH models. A checkpoint already in timm's names passes."""
    def register(fn: FilterFn) -> FilterFn:
        _LAYOUT_FILTERS[timm_class] = fn
        return fn
    return register


def remap_checkpoint(
        state_dict: Dict[str, torch.Tensor], model: nn.Module, new_head: bool = False,
) -> Dict[str, torch.Tensor]:
    """A checkpoint in any layout this package reads, under a NOAH model's own key names.

    The one remapping behind every way weights reach a NOAH model: pretrained tags and files, timm's
    `--pretrained-path`, `--initial-checkpoint`, and validate.py's `--checkpoint`. `new_head=True`
    (starting a run) lets a checkpoint of the linear-head sibling give the backbone while the model
    keeps its own fresh NOAH head; False (evaluating) leaves the head's keys as they are, so a
    checkpoint without a NOAH head is refused by the strict load. Models without a NOAH head: unchanged.
    """
    from .mlp_mixer import NoahMlpMixer, noah_checkpoint_filter_fn
    if isinstance(model, NoahMlpMixer):
        if new_head:
            return noah_checkpoint_filter_fn(state_dict, model)
        return _LAYOUT_FILTERS[MlpMixer](state_dict, model)
    if not is_noah_adapted(model):
        return state_dict
    for cls in type(model).__mro__:
        if cls in _LAYOUT_FILTERS:
            state_dict = _LAYOUT_FILTERS[cls](state_dict, model)
            break
    return noah_head_filter(state_dict, model) if new_head else state_dict


def build_noah_twin(
        build_stock: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        noah_args: Dict[str, Any],
        arch_args: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """`build_stock(variant, pretrained=False, **arch_args, **kwargs)` (timm's generator), a NOAH head, weights.

    `noah_args` / `arch_args` are the variant's published head settings and architecture; the caller's
    kwargs override both and are what the model records for config.json (the name fixes the rest).
    Weights go through `remap_checkpoint` (the family's `layout_filter`, then a fresh head where the
    checkpoint has the linear-head sibling's). `features_only=True` returns timm's feature extractor of
    the backbone (it has no head).
    """
    chosen = {k: kwargs.pop(k) for k in HEAD_ARGS if k in kwargs}
    head_args = dict(noah_args, **chosen)
    build_args = dict(arch_args or {}, **kwargs)
    if kwargs.get('features_only'):
        return build_stock(variant, pretrained=pretrained, **build_args)
    model = build_stock(variant, pretrained=False, **build_args)
    model.__class__ = noah_class(type(model))
    model._setup_noah(**head_args)
    # what config.json needs to rebuild this model (timm.create_model records its kwargs itself too)
    recorded = {k: v for k, v in kwargs.items() if k not in _NOT_MODEL_ARGS and v is not None}
    model._model_args = dict(getattr(model, '_model_args', {}), **recorded, **chosen)
    if pretrained:
        load_pretrained(
            model,
            pretrained_cfg=model.pretrained_cfg,
            num_classes=model.num_classes,
            in_chans=kwargs.get('in_chans', 3),
            filter_fn=partial(remap_checkpoint, new_head=True),
        )
    return model


# Options the factory hands to an entrypoint that say how to load or place a model, not what it is.
_NOT_MODEL_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args', 'cache_dir', 'device', 'dtype')
