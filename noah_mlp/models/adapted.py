"""`with_noah_head`: the timm entrypoint that rebuilds a model made by `noah_mlp.add_noah_head`.

`add_noah_head(timm.create_model('convnext_atto', num_classes=10))` records the backbone's name and
arguments, and its head settings, as the model's `_model_args`; `save_for_hf` writes them to config.json
with the architecture `with_noah_head`, so `timm.create_model('local-dir:DIR', pretrained=True)` (or an
`hf-hub:` id) makes the backbone again, adds the same head and loads the weights:

    timm.create_model('with_noah_head', backbone='resnet18', num_classes=10, key_ratio=0.25)

With `pretrained=True` and no weights of its own (no saved folder, no `pretrained_cfg_overlay`), the
backbone loads timm's published weights for `backbone` and the NOAH head starts fresh.
"""
from functools import partial
from typing import Any, Optional

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, load_pretrained, register_model
from timm.models._builder import resolve_pretrained_cfg

from ..adapt import add_noah_head
from ._twins import remap_checkpoint

default_cfgs = generate_default_cfgs({'with_noah_head': dict(url='', num_classes=1000)})


@register_model
def with_noah_head(
        pretrained: bool = False,
        backbone: Optional[str] = None,
        noah_head_num: int = 4,
        key_ratio: float = 0.5,
        head_drop_rate: float = 0.1,
        kv_split: bool = True,
        head_split: bool = True,
        noah_hidden_size: Optional[int] = None,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[dict] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm model `backbone` (made with `kwargs`) whose classifier is a NOAH head; see `add_noah_head`."""
    if not backbone:
        raise ValueError("with_noah_head needs backbone='<timm model name>' (the model to put a NOAH head on).")
    for key in ('pretrained_model_args', 'cache_dir'):
        kwargs.pop(key, None)
    # weights named by the caller or a saved folder hold the NOAH head; else the backbone's own timm weights
    from_source = pretrained_cfg is not None or bool(pretrained_cfg_overlay)
    model = timm.create_model(backbone, pretrained=pretrained and not from_source, **kwargs)
    backbone_cfg = dict(model.pretrained_cfg)
    add_noah_head(model, noah_head_num, key_ratio, head_drop_rate, kv_split, head_split, noah_hidden_size)
    if from_source:
        cfg = resolve_pretrained_cfg('with_noah_head', pretrained_cfg, pretrained_cfg_overlay).to_dict()
        # preprocessing the weights' source does not state is the backbone's
        cfg = dict(backbone_cfg, **{k: v for k, v in cfg.items() if v is not None})
        cfg.update(classifier=model.pretrained_cfg['classifier'], architecture='with_noah_head')
        model.pretrained_cfg = model.default_cfg = cfg
        if pretrained:
            load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=kwargs.get('in_chans', 3),
                            filter_fn=partial(remap_checkpoint, new_head=True))
    return model
