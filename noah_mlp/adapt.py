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
`reset_classifier`, `get_classifier` and adds `__prepare_scriptable__`), its parameter names and
`pretrained_cfg`; the NoahHead sits where the linear classifier was (`fc`, `classifier`, `head`, `head.fc`),
so `pretrained_cfg['classifier']` names it for timm's loaders. `forward_head(x, pre_logits=True)` still
returns timm's pooled embedding.
The models script (`torch.jit.script`, through `__prepare_scriptable__`) and FX-trace; see
docs/beyond_mlps.md, "TorchScript and FX".
"""
import copy
import types
from collections import OrderedDict
from typing import Any, Dict, Final, List, Optional, Tuple

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


def noah_feature_tokens(x: torch.Tensor, nhwc: bool, prefix_tokens: int) -> torch.Tensor:
    """forward_features output -> the (B, L, C) tokens NOAH attends over.

    A 4-D map becomes one token per position (`nhwc`: the map is (B, H, W, C), else (B, C, H, W)); 3-D tokens
    lose their `prefix_tokens` leading (class / distillation / register) tokens.
    """
    if x.dim() == 4:
        return x.flatten(1, 2) if nhwc else x.flatten(2).transpose(1, 2)
    if x.dim() == 3:
        return x[:, prefix_tokens:]
    raise ValueError('forward_features gave shape ' + str(x.shape) + '; NOAH needs a (B, C, H, W) or '
                     '(B, H, W, C) map or (B, L, C) tokens.')


# The layout is the tensor's rank, which FX proxies do not have: trace the call as a leaf.
torch.fx.wrap('noah_feature_tokens')


class NoahHeadPlan(nn.Module):
    """The head side of a NOAH model as TorchScript compiles it: the model's own modules, in the order
    `NoahAdapted.forward_head` runs them (map stages, tokens, token stages, dropout, NoahHead).

    `NoahAdapted.__prepare_scriptable__` builds one on the copy of the model that `torch.jit.script`
    compiles: TorchScript can only call submodules it reaches by attribute name, not the dotted paths the
    eager model resolves. The plan holds modules the model already owns, so it adds nothing to `state_dict`
    and takes nothing from `load_state_dict` (the scripted model keeps the eager model's keys).
    """
    has_head: Final[bool]
    nhwc: Final[bool]
    prefix_tokens: Final[int]
    drop_rate: Final[float]

    def __init__(
            self,
            map_stages: List[nn.Module],
            token_stages: List[nn.Module],
            drop: Optional[nn.Module],
            drop_rate: float,
            head: nn.Module,
            nhwc: bool,
            prefix_tokens: int,
    ) -> None:
        super().__init__()
        self.map_stages = nn.ModuleList(map_stages)
        self.token_stages = nn.ModuleList(token_stages)
        self.drop = drop if drop is not None else nn.Identity()
        self.drop_rate = float(drop_rate) if drop is None else 0.
        self.head = head
        self.has_head = isinstance(head, NoahHead)
        self.nhwc = nhwc
        self.prefix_tokens = prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.map_stages:
            x = stage(x)
        x = noah_feature_tokens(x, self.nhwc, self.prefix_tokens)
        for stage in self.token_stages:
            x = stage(x)
        x = self.drop(x)
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.head(x)

    # torch.jit.script copies ignored methods onto the scripted module, so both overrides hold there too.
    @torch.jit.ignore
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = '', keep_vars: bool = False) -> Any:
        """Nothing: every tensor here is saved under its owner's own name."""
        return destination if destination is not None else OrderedDict()

    @torch.jit.ignore
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The caller then hands each child module the entries under its prefix: give them their current
        # tensors (loaded a moment ago under the owners' names), so nothing here counts as missing.
        for name, value in nn.Module.state_dict(self, keep_vars=True).items():
            state_dict[prefix + name] = value


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
    the timm class the model extends, `_timm_forward_head` its `forward_head` (under a name of its own,
    so that TorchScript, which has no `super()`, can call it).

    Eager and FX resolve the paths at every call (modules replaced later, e.g. by SyncBatchNorm
    conversion, are the ones that run); TorchScript gets a `NoahHeadPlan` (see `__prepare_scriptable__`).
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
    @torch.jit.unused  # eager only: TorchScript would compile properties
    def noah_head(self) -> Optional[NoahHead]:
        head = self.get_submodule(self.noah_classifier)
        return head if isinstance(head, NoahHead) else None

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.noah_classifier)

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """timm's reset (pooling, bookkeeping), then a freshly initialised NOAH head (num_classes=0: none)."""
        super().reset_classifier(num_classes, *args, **kwargs)
        self._install_head(num_classes)

    def _noah_dropout(self) -> Tuple[Optional[nn.Module], float]:
        """The model's own pre-classifier dropout: its `head_drop` / `<head>.drop` module, else `drop_rate`."""
        drop = getattr(self, 'head_drop', None)
        if isinstance(drop, nn.Module):
            return drop, 0.
        parent = _parent_path(self.noah_classifier)
        drop = getattr(self.get_submodule(parent), 'drop', None) if parent else None
        if isinstance(drop, nn.Module):
            return drop, 0.
        p = getattr(self, 'drop_rate', 0.)
        return None, float(p) if isinstance(p, float) and p > 0. else 0.

    def _noah_nhwc(self) -> bool:
        return getattr(self, 'output_fmt', 'NCHW') == 'NHWC'

    def _noah_tokens(self, x: torch.Tensor) -> torch.Tensor:
        for path in self.noah_map_stages:
            x = self.get_submodule(path)(x)
        x = noah_feature_tokens(x, self._noah_nhwc(), self.noah_prefix_tokens)
        for path in self.noah_token_stages:
            x = self.get_submodule(path)(x)
        return x

    def forward_noah_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[int, int]]]:
        """forward_features output -> (tokens (B, L, C) the head attends over, (H', W') grid or None for NLC)."""
        grid = None
        if x.ndim == 4:
            grid = (x.shape[1], x.shape[2]) if self._noah_nhwc() else (x.shape[2], x.shape[3])
        return self._noah_tokens(x), grid

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if torch.jit.is_scripting():
            # compiled alone: TorchScript drops the eager code below this branch
            plan = self.noah_plan
            if pre_logits or not plan.has_head:
                return self._timm_forward_head(x, pre_logits=True)
            return plan(x)
        head = self.noah_head
        if pre_logits or head is None:
            return self._timm_forward_head(x, pre_logits=True)  # timm's pooled embedding
        x = self._noah_tokens(x)
        drop, p = self._noah_dropout()
        if drop is not None:
            x = drop(x)
        elif p > 0.:
            x = F.dropout(x, p=p, training=self.training)
        return head(x)

    def __prepare_scriptable__(self) -> nn.Module:
        """What `torch.jit.script` compiles: a shallow copy (same modules and tensors) that also holds a
        `NoahHeadPlan` as `noah_plan`. The model itself is left as it is."""
        drop, p = self._noah_dropout()
        plan = NoahHeadPlan(
            [self.get_submodule(path) for path in self.noah_map_stages],
            [self.get_submodule(path) for path in self.noah_token_stages],
            drop, p, self.get_submodule(self.noah_classifier), self._noah_nhwc(), self.noah_prefix_tokens)
        plan.training = self.training  # its own flag only: the modules it holds keep theirs
        scripted = copy.copy(self)
        modules = OrderedDict(self._modules)  # the copy's own dict: the model's stays as it is
        modules['noah_plan'] = plan
        scripted.__dict__['_modules'] = modules
        return scripted

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
        new = type(name, (NoahAdapted, cls), {
            '__init__': __init__, '__module__': __name__, '__qualname__': name,
            '__doc__': f'timm {cls.__name__} with a NOAH head.', 'timm_class': cls,
            '_timm_forward_head': _renamed(cls.forward_head, '_timm_forward_head', name)})
        globals()[name] = new
        _CLASSES[cls] = new
    return _CLASSES[cls]


def _renamed(fn: Any, name: str, owner: str) -> Any:
    """`fn` (a timm `forward_head`) under another name: TorchScript names a method by its function's name."""
    if not isinstance(fn, types.FunctionType):
        return fn
    out = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    out.__annotations__ = dict(fn.__annotations__)
    out.__qualname__ = f'{owner}.{name}'
    out.__doc__ = fn.__doc__
    return out


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
