"""NOAH on any timm classification model: `add_noah_head(model)`.

The NOAH head attends over a backbone's final tokens. timm models hand their classifier one of three
layouts, and `add_noah_head` turns each into the (B, L, C) tokens NoahHead takes:

* NCHW feature maps (ResNet, MobileNet, EfficientNet, RegNet, ConvNeXt): every spatial position is a token;
* NHWC feature maps (Swin and other models that declare `output_fmt='NHWC'`): the same;
* NLC tokens (ViT / DeiT / EVA, MLP-Mixer): the model's `num_prefix_tokens` leading tokens (class,
  distillation, register tokens) are dropped and NOAH attends over the patch tokens only. The paper's NOAH
  DeiT has no class token at all: build the backbone with `class_token=False, global_pool='avg',
  fc_norm=False` (the registered `noah_deit_*` models do).

Work the stock head does per position before pooling is kept per token: the final norm of a ConvNeXt-style
`NormMlpClassifierHead` (and its pre-logits MLP), a ViT's `fc_norm`. MobileNetV3's head pools first and then
runs a 1x1 conv + activation; as in the NOAH authors' MobileNetV3 that conv runs at every position and NOAH
attends over its output. The model's own pre-classifier dropout (`drop_rate`) is applied to the tokens.

The model keeps its class's behaviour (a per-instance subclass only overrides `forward_head`,
`reset_classifier` and `get_classifier`), its parameter names and `pretrained_cfg`; the NoahHead sits where
the linear classifier was (`fc`, `classifier`, `head`, `head.fc`), so `pretrained_cfg['classifier']` names
it for timm's loaders. `forward_head(x, pre_logits=True)` still returns timm's pooled embedding.
"""
import copy
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .head import NoahHead

__all__ = ['add_noah_head', 'is_noah_adapted', 'noah_class', 'NoahAdapted', 'UnsupportedModelError']


class UnsupportedModelError(UserError, ValueError):
    """A model whose features or classifier `add_noah_head` cannot interpret."""


# NOAH settings, by the names the registered models and their config.json use.
HEAD_ARGS = ('noah_head_num', 'key_ratio', 'head_drop_rate', 'kv_split', 'head_split', 'noah_hidden_size')


def _classifier_path(model: nn.Module, get_classifier=None) -> str:
    """Dotted path of the module the model's `get_classifier()` returns (the linear layer NOAH replaces)."""
    name = type(model).__name__
    if not callable(getattr(model, 'get_classifier', None)) or not callable(getattr(model, 'forward_head', None)):
        raise UnsupportedModelError(
            f'{name} is not a timm classification model (no get_classifier / forward_head): '
            f'add_noah_head needs a model made by timm.create_model.')
    classifier = (get_classifier or model.get_classifier)()
    if isinstance(classifier, (tuple, list)) or getattr(model, 'head_dist', None) is not None:
        raise UnsupportedModelError(
            f'{name} has two classifiers (a distillation head); add_noah_head replaces one linear classifier. '
            f'Use the non-distilled variant of the model.')
    if getattr(model, 'attn_pool', None) is not None:
        raise UnsupportedModelError(
            f"{name} pools its tokens with a learned attention pool (global_pool='map'); NOAH replaces "
            f"pooling: create the model with global_pool='avg' or 'token'.")
    if not isinstance(classifier, (nn.Linear, nn.Identity)) and not (
            isinstance(classifier, nn.Conv2d) and classifier.kernel_size == (1, 1)):
        raise UnsupportedModelError(
            f'{name}.get_classifier() is a {type(classifier).__name__}, not a linear layer: '
            f'add_noah_head cannot tell what it computes.')
    for path, module in model.named_modules():
        if module is classifier and path:
            return path
    raise UnsupportedModelError(f'{name}.get_classifier() is not a submodule of the model.')


def _token_channels(model: nn.Module, classifier: nn.Module) -> int:
    chs = getattr(classifier, 'in_features', None) or getattr(classifier, 'in_channels', None)
    chs = chs or getattr(model, 'head_hidden_size', None) or getattr(model, 'num_features', None)
    if not chs:
        raise UnsupportedModelError(f'cannot tell how many channels {type(model).__name__} gives its classifier.')
    return int(chs)


def _parent_path(path: str) -> str:
    return path.rpartition('.')[0]


def _is_mobilenetv3_head(model: nn.Module) -> bool:
    # timm's MobileNetV3 class (also MobileNetV4, LCNet, ...) pools, then runs conv_head / norm_head / act2
    from timm.models.mobilenetv3 import MobileNetV3
    return isinstance(model, MobileNetV3)


class NoahAdapted:
    """Mixin placed in front of a timm model class: the classifier is a NOAH head over the final tokens.

    Attributes set by `_setup_noah` (plain Python values, so they survive deepcopy / EMA copies):
    `noah_classifier` (dotted path of the head), `noah_map_stages` (paths of modules run on the native
    feature map before it becomes tokens), `noah_token_stages` (paths run on the (B, L, C) tokens),
    `noah_prefix_tokens` (leading tokens left out) and the head settings. `type(model).timm_class` is
    the timm class the model extends.
    """

    def _setup_noah(
            self,
            noah_head_num: int = 4,
            key_ratio: float = 0.5,
            head_drop_rate: float = 0.1,
            kv_split: bool = True,
            head_split: bool = True,
            noah_hidden_size: Optional[int] = None,
    ) -> None:
        path = _classifier_path(self, super().get_classifier)
        classifier = self.get_submodule(path)
        self.noah_classifier = path
        self.noah_head_num = noah_head_num
        self.key_ratio = key_ratio
        self.head_drop_rate = head_drop_rate
        self.kv_split = kv_split
        self.head_split = head_split
        self.noah_hidden_size = noah_hidden_size
        self.noah_prefix_tokens = int(getattr(self, 'num_prefix_tokens', 0) or 0)
        self.noah_map_stages, self.noah_token_stages = self._stage_rules(path)
        in_chs = _token_channels(self, classifier)
        if noah_hidden_size:
            # the NOAH authors' narrow DeiTs map the tokens to a wider space (Linear + Tanh) before the head
            self.noah_pre_logits = nn.Sequential(OrderedDict([
                ('fc', nn.Linear(in_chs, noah_hidden_size, **self._device_dtype())), ('act', nn.Tanh())]))
            self.noah_token_stages = self.noah_token_stages + ['noah_pre_logits']
            in_chs = noah_hidden_size
        self.noah_in_features = in_chs
        self._install_head(int(getattr(self, 'num_classes', 0) or 0))
        cfg = dict(getattr(self, 'pretrained_cfg', None) or {})
        cfg['classifier'] = (f'{path}.query', f'{path}.value')
        self.pretrained_cfg = cfg
        self.default_cfg = cfg  # timm keeps both names for the same dict

    def __reduce_ex__(self, protocol):
        # The subclass is made at run time; pickle it as "NOAH subclass of <timm class>" so that
        # torch.save(model) loads in a process that has not made it yet (deepcopy goes the same way).
        fn, args, *rest = super().__reduce_ex__(protocol)
        if args and args[0] is type(self):
            return (_new_adapted, (type(self).timm_class,) + tuple(args[1:]), *rest)
        return (fn, args, *rest)

    def _stage_rules(self, path: str) -> Tuple[List[str], List[str]]:
        """Which of the model's own head modules run per position, before / after the tokens are formed."""
        map_stages: List[str] = []
        token_stages: List[str] = []
        if _is_mobilenetv3_head(self):
            map_stages += ['conv_head', 'norm_head', 'act2']
        parent = _parent_path(path)
        head = self.get_submodule(parent) if parent else None
        if head is not None and hasattr(head, 'norm') and hasattr(head, 'pre_logits'):
            # NormMlpClassifierHead (ConvNeXt, MaxViT, ...): norm in the map's own layout, pre-logits MLP per token
            map_stages.append(f'{parent}.norm')
            token_stages.append(f'{parent}.pre_logits')
        if isinstance(getattr(self, 'fc_norm', None), nn.Module):
            token_stages.append('fc_norm')  # ViT with global_pool='avg': the final norm moved after pooling
        return map_stages, token_stages

    def _device_dtype(self) -> Dict[str, Any]:
        ref = next(self.parameters(), None)
        return dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}

    def _install_head(self, num_classes: int) -> None:
        dd = self._device_dtype()
        if num_classes > 0:
            head = NoahHead(
                self.noah_in_features, num_classes, num_heads=self.noah_head_num, key_ratio=self.key_ratio,
                drop=self.head_drop_rate, kv_split=self.kv_split, head_split=self.head_split, **dd)
            # the NOAH authors' CNN / DeiT heads: Kaiming-normal (fan out) weights, zero biases
            for conv in (head.query, head.value):
                nn.init.kaiming_normal_(conv.weight, mode='fan_out')
                nn.init.zeros_(conv.bias)
        else:
            head = nn.Identity()
        head.train(self.training)
        self.set_submodule(self.noah_classifier, head)

    @property
    def noah_head(self) -> Optional[NoahHead]:
        head = self.get_submodule(self.noah_classifier)
        return head if isinstance(head, NoahHead) else None

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.noah_classifier)

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """timm's reset (pooling, bookkeeping), then a freshly initialised NOAH head (num_classes=0: none)."""
        super().reset_classifier(num_classes, *args, **kwargs)
        self._install_head(num_classes)

    def _run(self, paths: List[str], x: torch.Tensor) -> torch.Tensor:
        for path in paths:
            x = self.get_submodule(path)(x)
        return x

    def _token_dropout(self, x: torch.Tensor) -> torch.Tensor:
        drop = getattr(self, 'head_drop', None)
        if isinstance(drop, nn.Module):
            return drop(x)
        parent = _parent_path(self.noah_classifier)
        drop = getattr(self.get_submodule(parent), 'drop', None) if parent else None
        if isinstance(drop, nn.Module):
            return drop(x)
        p = getattr(self, 'drop_rate', 0.)
        return F.dropout(x, p=float(p), training=self.training) if isinstance(p, float) and p > 0. else x

    def forward_noah_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[int, int]]]:
        """forward_features output -> (tokens (B, L, C) the head attends over, (H', W') grid or None for NLC)."""
        if x.ndim == 4:
            x = self._run(self.noah_map_stages, x)
            if getattr(self, 'output_fmt', 'NCHW') == 'NHWC':
                grid = (x.shape[1], x.shape[2])
                x = x.flatten(1, 2)
            else:
                grid = (x.shape[2], x.shape[3])
                x = x.flatten(2).transpose(1, 2)
        elif x.ndim == 3:
            grid = None
            x = x[:, self.noah_prefix_tokens:]
        else:
            raise ValueError(
                f'{type(self).__name__}.forward_features gave shape {tuple(x.shape)}; NOAH needs a (B, C, H, W) '
                f'or (B, H, W, C) map or (B, L, C) tokens.')
        return self._run(self.noah_token_stages, x), grid

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        head = self.noah_head
        if pre_logits or head is None:
            return super().forward_head(x, pre_logits=True)  # timm's pooled embedding
        tokens, _ = self.forward_noah_tokens(x)
        return head(self._token_dropout(tokens))

    def noah_token_grid(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(H', W') of the tokens for images of `image_size` (to lay attention maps out as images)."""
        embed = getattr(self, 'patch_embed', None) or getattr(self, 'stem', None)
        if embed is not None and hasattr(embed, 'dynamic_feat_size'):
            return tuple(int(v) for v in embed.dynamic_feat_size(tuple(image_size)))
        info = getattr(self, 'feature_info', None)
        if info:  # feature maps: the final stage's stride (padded convolutions round up)
            reduction = info[-1]['reduction']
            return tuple(-(-int(v) // reduction) for v in image_size)
        raise TypeError(f'{type(self).__name__}: cannot lay its tokens out as an image grid.')


_CLASSES: Dict[type, type] = {}


def noah_class(cls: type) -> type:
    """The subclass of timm model class `cls` with a NOAH head (made once per class, then reused).

    Constructing it takes the class's own arguments plus `noah_head_num`, `key_ratio`, `head_drop_rate`,
    `kv_split`, `head_split`, `noah_hidden_size`; `add_noah_head` turns an existing instance into one.
    """
    if issubclass(cls, NoahAdapted):
        return cls
    if cls not in _CLASSES:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            head_args = {k: kwargs.pop(k) for k in HEAD_ARGS if k in kwargs}
            cls.__init__(self, *args, **kwargs)
            self._setup_noah(**head_args)

        name = f'Noah{cls.__name__}'
        if name in globals():  # two timm classes of the same name
            name = f'Noah{cls.__name__}_{cls.__module__.replace(".", "_")}'
        new = type(name, (NoahAdapted, cls), {'__init__': __init__, '__module__': __name__, '__qualname__': name,
                                              '__doc__': f'timm {cls.__name__} with a NOAH head.', 'timm_class': cls})
        globals()[name] = new
        _CLASSES[cls] = new
    return _CLASSES[cls]


def _new_adapted(base: type, *args: Any) -> nn.Module:
    cls = noah_class(base)
    return cls.__new__(cls, *args)


def is_noah_adapted(model: nn.Module) -> bool:
    return isinstance(model, NoahAdapted)


def add_noah_head(
        model: nn.Module,
        num_heads: int = 4,
        key_ratio: float = 0.5,
        drop: float = 0.1,
        kv_split: bool = True,
        head_split: bool = True,
        hidden_size: Optional[int] = None,
) -> nn.Module:
    """Replace the linear classifier of a timm model by a NOAH head over its final tokens; returns `model`.

    Args:
        model: a timm classification model (`timm.create_model(name, ...)`), changed in place.
        num_heads: N, groups of the head, each with its own attention map per class.
        key_ratio: r, the fraction of channels used as keys (the rest are values).
        drop: dropout on the values v[b, n, k, l] while training.
        kv_split / head_split: NoahHead's options.
        hidden_size: if set, a Linear(C, hidden_size) + Tanh runs on every token before the head (the NOAH
            authors' DeiT-Tiny x0.75 / x0.5 use 192).

    The backbone keeps its weights; the head is new (Kaiming-normal, zero biases). Models whose features or
    classifier it cannot interpret raise `UnsupportedModelError` (a ValueError) that says why.
    `save_for_hf` of the result writes a folder that `timm.create_model('local-dir:...')` rebuilds
    (architecture `with_noah_head`, see `noah_mlp.models.adapted`).
    """
    from .models.mlp_mixer import NoahMlpMixer
    if isinstance(model, (NoahAdapted, NoahMlpMixer)):
        raise UnsupportedModelError(f'{type(model).__name__} already has a NOAH head.')
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f'add_noah_head needs a torch.nn.Module, got {type(model).__name__}.')
    _classifier_path(model)  # refuse before changing anything
    cfg = copy.deepcopy(dict(getattr(model, 'pretrained_cfg', None) or {}))
    backbone = cfg.get('architecture')
    model.__class__ = noah_class(type(model))
    model._setup_noah(num_heads, key_ratio, drop, kv_split, head_split, hidden_size)
    if backbone:
        # rebuildable from config.json: the `with_noah_head` entrypoint makes the backbone and adds this head
        recorded = {k: v for k, v in getattr(model, '_model_args', {}).items()}
        model._model_args = dict(
            recorded, backbone=backbone, noah_head_num=num_heads, key_ratio=key_ratio, kv_split=kv_split,
            head_split=head_split, **({'noah_hidden_size': hidden_size} if hidden_size else {}))
        model.pretrained_cfg = dict(model.pretrained_cfg, architecture='with_noah_head')
        model.default_cfg = model.pretrained_cfg
    return model


def noah_head_filter(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Pretrained filter for a NOAH model loading its linear-head sibling's weights.

    Drops the sibling's classifier (`<path>.weight` / `.bias`) and keeps the model's own freshly
    initialised head (and other NOAH-only parameters), so timm's strict load starts a new NOAH head.
    Weights that already hold a NOAH head pass through unchanged.
    """
    path = model.noah_classifier
    out = {k: v for k, v in state_dict.items() if k not in (f'{path}.weight', f'{path}.bias')}
    own = model.state_dict()
    noah_keys = [k for k in own if k.startswith(f'{path}.') or k.startswith('noah_pre_logits.')]
    if not any(k in out for k in noah_keys):
        for k in noah_keys:
            out[k] = own[k]
    return out
