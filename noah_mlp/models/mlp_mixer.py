"""NOAH MLP-Mixer / ResMLP / gMLP models and the width-scaled baselines timm lacks.

Every MLP-Mixer-family architecture timm registers gets a `noah_` twin whose linear classifier is a
NOAH head (N=4, r=1/2, value dropout 0.1 by default, as published). The seed's x0.75 / x0.5 width
variants of Mixer-S/16 and gMLP-Ti/16 are registered both with timm's linear head and with NOAH.

Backbone key names are timm's (`stem.*`, `blocks.{i}.*`, `norm.*`), the head is `head.query.*` /
`head.value.*`: checkpoints of the upstream NOAH code load with strict=True.
"""
import logging
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.layers import GatedMlp, GluMlp, lecun_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, SpatialGatingBlock, checkpoint_filter_fn

from ..head import NoahHead
from ._twins import layout_filter, sibling_cfgs

__all__ = ['NoahMlpMixer', 'NOAH_MODEL_ARGS', 'BASELINE_MODEL_ARGS', 'noah_checkpoint_filter_fn']

_logger = logging.getLogger(__name__)


class NoahMlpMixer(MlpMixer):
    """timm's MlpMixer (Mixer, ResMLP, gMLP blocks) with a NOAH head on the final tokens.

    `forward_head(x, pre_logits=True)` returns what timm's MlpMixer does (tokens pooled by
    `global_pool`), so `num_classes=0` still gives a (B, C) embedding; the logits come from the
    NOAH head applied to the (B, L, C) tokens, never to the pooled vector.
    """

    def __init__(
            self,
            num_classes: int = 1000,
            noah_head_num: int = 4,
            key_ratio: float = 0.5,
            head_drop_rate: float = 0.1,
            head_split: bool = True,
            kv_split: bool = True,
            linear_head_init: bool = False,
            **kwargs: Any,
    ) -> None:
        """NOAH settings as in `NoahHead`; `linear_head_init=True` starts the head from the linear head
        of pretrained weights loaded through timm (exact, needs kv_split=False; see init_head_from_linear)."""
        self.noah_head_num = noah_head_num
        self.linear_head_init = linear_head_init
        self.key_ratio = key_ratio
        self.head_drop_rate = head_drop_rate
        self.head_split = head_split
        self.kv_split = kv_split
        # MlpMixer builds and initialises a Linear head; swap in the NOAH head right after.
        super().__init__(num_classes=num_classes, **kwargs)
        self.reset_classifier(num_classes)

    def _make_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = NoahHead(
            self.embed_dim,
            num_classes,
            num_heads=self.noah_head_num,
            key_ratio=self.key_ratio,
            drop=self.head_drop_rate,
            kv_split=self.kv_split,
            head_split=self.head_split,
            device=device,
            dtype=dtype,
        )
        # upstream initialises the head convolutions as timm's Mixer init does any Conv2d
        for conv in (head.query, head.value):
            lecun_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        return head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head by a freshly initialised NOAH head for `num_classes` (0: no head)."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg'):
                raise ValueError(f"global_pool must be '' or 'avg', got {global_pool!r}.")
            self.global_pool = global_pool
        ref = next(self.parameters(), None)
        dd = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        self.head = self._make_head(num_classes, **dd)
        self.head.train(self.training)

    @torch.no_grad()
    def init_head_from_linear(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Set the NOAH head so that its logits equal `GAP + Linear(weight, bias)` exactly.

        With zero query weights every attention map is uniform, so group n returns the mean of its
        value channels; with kv_split=False the value channels are all C channels (or, with
        head_split, group n's slice of them), so value weights taken from the linear weights
        (split by group) and biases divided over the N groups give the linear head's logits.
        With kv_split=True the values miss the key channels and no NOAH head equals the linear one.
        """
        head = self.head
        if not isinstance(head, NoahHead):
            raise ValueError('init_head_from_linear needs a NOAH head (num_classes > 0).')
        if head.kv_split:
            raise ValueError(
                'a NOAH head starts exactly from a linear head only with kv_split=False (with kv_split=True '
                'its values see a fraction of the channels); build the model with kv_split=False.')
        K, C, N = head.num_classes, head.in_features, head.num_heads
        if tuple(weight.shape) != (K, C):
            raise ValueError(
                f'the linear head is {tuple(weight.shape)} (classes, channels); this NOAH head needs ({K}, {C}).')
        w = weight.to(head.value.weight)
        b = torch.zeros(K).to(w) if bias is None else bias.to(w)
        if head.head_split:
            values = w.reshape(K, N, C // N).transpose(0, 1)  # group n: its channel slice of each class row
        else:
            values = (w / N).unsqueeze(0).expand(N, K, C)
        head.value.weight.copy_(values.reshape(head.value.weight.shape))
        head.value.bias.copy_((b / N).repeat(N))
        head.query.weight.zero_()
        head.query.bias.zero_()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits or self.num_classes <= 0:
            # timm's pooled embedding (spelled out: TorchScript cannot call super())
            if self.global_pool == 'avg':
                x = x.mean(dim=1)
            return self.head_drop(x)
        return self.head(self.head_drop(x))


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'stem.proj', 'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


def _noah_cfg(**kwargs: Any) -> Dict[str, Any]:
    return _cfg(
        classifier=('head.query', 'head.value'),
        paper_ids='NOAH: Learning Pairwise Object Category Attentions for Image Classification',
        **kwargs,
    )


_MIXER = dict(mlp_ratio=(0.5, 4.0))
_GMIXER = dict(patch_size=16, num_blocks=12, embed_dim=384, mlp_ratio=(1.0, 4.0), mlp_layer=GluMlp, act_layer=nn.SiLU)
_RESMLP = dict(patch_size=16, embed_dim=384, mlp_ratio=4, norm_layer=Affine)
_GMLP = dict(patch_size=16, num_blocks=30, mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)

# Architecture of every NOAH twin, keyed by the timm name of its linear-head sibling.
NOAH_MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    'mixer_s32_224': dict(_MIXER, patch_size=32, num_blocks=8, embed_dim=512),
    'mixer_s16_224': dict(_MIXER, patch_size=16, num_blocks=8, embed_dim=512),
    'mixer_s16_075_224': dict(_MIXER, patch_size=16, num_blocks=8, embed_dim=384),
    'mixer_s16_050_224': dict(_MIXER, patch_size=16, num_blocks=8, embed_dim=256),
    'mixer_b32_224': dict(_MIXER, patch_size=32, num_blocks=12, embed_dim=768),
    'mixer_b16_224': dict(_MIXER, patch_size=16, num_blocks=12, embed_dim=768),
    'mixer_l32_224': dict(_MIXER, patch_size=32, num_blocks=24, embed_dim=1024),
    'mixer_l16_224': dict(_MIXER, patch_size=16, num_blocks=24, embed_dim=1024),
    'gmixer_12_224': dict(_GMIXER),
    'gmixer_24_224': dict(_GMIXER, num_blocks=24),
    'resmlp_12_224': dict(_RESMLP, num_blocks=12, block_layer=ResBlock),
    'resmlp_24_224': dict(_RESMLP, num_blocks=24, block_layer=partial(ResBlock, init_values=1e-5)),
    'resmlp_36_224': dict(_RESMLP, num_blocks=36, block_layer=partial(ResBlock, init_values=1e-6)),
    'resmlp_big_24_224': dict(
        _RESMLP, patch_size=8, num_blocks=24, embed_dim=768, block_layer=partial(ResBlock, init_values=1e-6)),
    'gmlp_ti16_224': dict(_GMLP, embed_dim=128),
    'gmlp_ti16_075_224': dict(_GMLP, embed_dim=96),
    'gmlp_ti16_050_224': dict(_GMLP, embed_dim=64),
    'gmlp_s16_224': dict(_GMLP, embed_dim=256),
    'gmlp_b16_224': dict(_GMLP, embed_dim=512),
}

# Width-scaled linear-head baselines from the seed that timm does not register.
BASELINE_MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    name: NOAH_MODEL_ARGS[name]
    for name in ('mixer_s16_075_224', 'mixer_s16_050_224', 'gmlp_ti16_075_224', 'gmlp_ti16_050_224')
}


def _noah_cfgs(sibling: str) -> Dict[str, Dict[str, Any]]:
    # a twin with published sibling weights has only their tags (as timm's mixer_b16_224 has);
    # a twin without any has the NOAH release's data config (mean/std 0.5, crop 0.9)
    return sibling_cfgs(f'noah_{sibling}', sibling, base=_noah_cfg(), note=(
        ', or from its linear head with kv_split=False, linear_head_init=True'))


default_cfgs = generate_default_cfgs({
    **{k: v for name in NOAH_MODEL_ARGS for k, v in _noah_cfgs(name).items()},
    **{name: _cfg() for name in BASELINE_MODEL_ARGS},
})


# timm's own remapping of older Mixer / ResMLP layouts is the family's layout filter
layout_filter(MlpMixer)(checkpoint_filter_fn)


def noah_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's pretrained filter for the NOAH twins: stock timm Mixer / ResMLP / gMLP weights in, NOAH model out.

    Old layouts are remapped by timm's own `checkpoint_filter_fn`. A NOAH checkpoint passes through.
    A linear-head checkpoint (`head.weight` / `head.bias`) gives its backbone; the NOAH head starts
    fresh, or from that linear head when the model was built with `linear_head_init=True`. The head
    is set on the model here and its tensors go into the returned dict, so timm still loads strictly
    (and, where it drops a classifier of another class count, the head set here stays).
    """
    state_dict = checkpoint_filter_fn(state_dict, model)
    if not isinstance(model, NoahMlpMixer) or 'head.weight' not in state_dict:
        return state_dict
    state_dict = dict(state_dict)
    weight, bias = state_dict.pop('head.weight'), state_dict.pop('head.bias', None)
    if not isinstance(model.head, NoahHead):  # num_classes=0: a backbone only
        return state_dict
    if model.linear_head_init:
        model.init_head_from_linear(weight, bias)  # raises with the reason where it cannot be exact
        _logger.info(f'Pretrained backbone loaded; NOAH head started from the checkpoint\'s linear head '
                     f'({weight.shape[0]} classes): the model starts at the linear model\'s logits.')
    else:
        _logger.info(f'Pretrained backbone loaded; the checkpoint\'s linear head ({weight.shape[0]} classes) is '
                     f'dropped and the NOAH head ({model.num_classes} classes) starts fresh.')
    state_dict.update({f'head.{k}': v for k, v in model.head.state_dict().items()})
    return state_dict


def _build(model_cls: type, variant: str, pretrained: bool, arch_args: Dict[str, Any], **kwargs: Any) -> MlpMixer:
    # caller's kwargs override architecture defaults instead of colliding with them
    model_args = dict(arch_args, **kwargs)
    out_indices = model_args.pop('out_indices', 3)
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=noah_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **model_args,
    )
    _record_model_args(model, kwargs)
    return model


# Options the factory hands to an entrypoint that say how to load or place a model, not what it is.
_NOT_MODEL_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args', 'cache_dir', 'device', 'dtype')


def _record_model_args(model: nn.Module, kwargs: Dict[str, Any]) -> None:
    """Keep the caller's overrides (noah_head_num, key_ratio, img_size, ...) on the model.

    timm's save_for_hf writes `model._model_args` to config.json as `model_args`, which
    `create_model('local-dir:...')` / `'hf-hub:...'` pass back to the entrypoint. timm.create_model
    records its own kwargs there too; this also covers calling an entrypoint function directly.
    The per-variant defaults (block / mlp layer classes, ...) are not recorded: the name fixes them.
    """
    recorded = {k: v for k, v in kwargs.items() if k not in _NOT_MODEL_ARGS and v is not None}
    model._model_args = dict(getattr(model, '_model_args', {}), **recorded)


def _create_noah(variant: str, pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    return _build(NoahMlpMixer, variant, pretrained, NOAH_MODEL_ARGS[variant[len('noah_'):]], **kwargs)


def _create_baseline(variant: str, pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    return _build(MlpMixer, variant, pretrained, BASELINE_MODEL_ARGS[variant], **kwargs)


@register_model
def mixer_s16_075_224(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """Mixer-S/16 x0.75 width (embed 384), linear head: the seed's baseline."""
    return _create_baseline('mixer_s16_075_224', pretrained, **kwargs)


@register_model
def mixer_s16_050_224(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """Mixer-S/16 x0.5 width (embed 256), linear head: the seed's baseline."""
    return _create_baseline('mixer_s16_050_224', pretrained, **kwargs)


@register_model
def gmlp_ti16_075_224(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """gMLP-Ti/16 x0.75 width (embed 96), linear head: the seed's baseline."""
    return _create_baseline('gmlp_ti16_075_224', pretrained, **kwargs)


@register_model
def gmlp_ti16_050_224(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """gMLP-Ti/16 x0.5 width (embed 64), linear head: the seed's baseline."""
    return _create_baseline('gmlp_ti16_050_224', pretrained, **kwargs)


@register_model
def noah_mixer_s32_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Mixer-S/32 with a NOAH head."""
    return _create_noah('noah_mixer_s32_224', pretrained, **kwargs)


@register_model
def noah_mixer_s16_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Mixer-S/16 with a NOAH head (seed: 18.54M params, 75.09% top-1)."""
    return _create_noah('noah_mixer_s16_224', pretrained, **kwargs)


@register_model
def noah_mixer_s16_075_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Mixer-S/16 x0.75 with a NOAH head (seed: 10.76M params, 72.32% top-1)."""
    return _create_noah('noah_mixer_s16_075_224', pretrained, **kwargs)


@register_model
def noah_mixer_s16_050_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Mixer-S/16 x0.5 with a NOAH head (seed: 5.08M params, 66.81% top-1)."""
    return _create_noah('noah_mixer_s16_050_224', pretrained, **kwargs)


@register_model
def noah_mixer_b32_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Mixer-B/32 with a NOAH head."""
    return _create_noah('noah_mixer_b32_224', pretrained, **kwargs)


@register_model
def noah_mixer_b16_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Mixer-B/16 with a NOAH head (seed: 59.88M params, 77.49% top-1)."""
    return _create_noah('noah_mixer_b16_224', pretrained, **kwargs)


@register_model
def noah_mixer_l32_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Mixer-L/32 with a NOAH head."""
    return _create_noah('noah_mixer_l32_224', pretrained, **kwargs)


@register_model
def noah_mixer_l16_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Mixer-L/16 with a NOAH head."""
    return _create_noah('noah_mixer_l16_224', pretrained, **kwargs)


@register_model
def noah_gmixer_12_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Glu-Mixer-12 (timm's SwiGLU Mixer) with a NOAH head."""
    return _create_noah('noah_gmixer_12_224', pretrained, **kwargs)


@register_model
def noah_gmixer_24_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """Glu-Mixer-24 (timm's SwiGLU Mixer) with a NOAH head."""
    return _create_noah('noah_gmixer_24_224', pretrained, **kwargs)


@register_model
def noah_resmlp_12_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """ResMLP-12 with a NOAH head."""
    return _create_noah('noah_resmlp_12_224', pretrained, **kwargs)


@register_model
def noah_resmlp_24_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """ResMLP-24 with a NOAH head."""
    return _create_noah('noah_resmlp_24_224', pretrained, **kwargs)


@register_model
def noah_resmlp_36_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """ResMLP-36 with a NOAH head."""
    return _create_noah('noah_resmlp_36_224', pretrained, **kwargs)


@register_model
def noah_resmlp_big_24_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """ResMLP-B-24 (patch 8) with a NOAH head."""
    return _create_noah('noah_resmlp_big_24_224', pretrained, **kwargs)


@register_model
def noah_gmlp_ti16_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """gMLP-Ti/16 with a NOAH head (seed: 5.87M params, 73.39% top-1)."""
    return _create_noah('noah_gmlp_ti16_224', pretrained, **kwargs)


@register_model
def noah_gmlp_ti16_075_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """gMLP-Ti/16 x0.75 with a NOAH head (3.87M params; the seed's 3.91M does not follow from its architecture)."""
    return _create_noah('noah_gmlp_ti16_075_224', pretrained, **kwargs)


@register_model
def noah_gmlp_ti16_050_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """gMLP-Ti/16 x0.5 with a NOAH head (seed: 2.41M params, 56.89% top-1)."""
    return _create_noah('noah_gmlp_ti16_050_224', pretrained, **kwargs)


@register_model
def noah_gmlp_s16_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """gMLP-S/16 with a NOAH head (seed: 19.42M params, 79.95% top-1)."""
    return _create_noah('noah_gmlp_s16_224', pretrained, **kwargs)


@register_model
def noah_gmlp_b16_224(pretrained: bool = False, **kwargs: Any) -> NoahMlpMixer:
    """gMLP-B/16 with a NOAH head."""
    return _create_noah('noah_gmlp_b16_224', pretrained, **kwargs)
