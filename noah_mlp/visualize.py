"""Pictures of what a NOAH model attends to, and the `noah-visualize` command.

    python -m noah_mlp.visualize --model noah_gmlp_ti16_224 --checkpoint model_best.pth.tar \\
        --topk 3 --out attention/ cat.jpg dog.png

writes one PNG per image: a row for each of the top-k classes (name and probability), columns for
the input, the attention map of each NOAH group and the mean over the groups, each map upsampled
to the image and overlaid on it. From Python:

    loaded = load_noah_model('noah_gmlp_ti16_224', 'model_best.pth.tar')
    paths = write_attention_figures(loaded.model, ['cat.jpg'], 'attention/', class_names=loaded.class_names,
                                    data_config=loaded.data_config)

Drawing goes through matplotlib's object-oriented API on an Agg canvas, so no display (and no
pyplot state) is ever needed.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.utils import ParseKwargs

from .attention import NoahAttention, noah_attention, noah_head_of, token_grid
from .checkpoint import safe_load
from .cli_common import create_model_checked
from .sharing import model_input_size
from .errors import UserError, cli_main

__all__ = [
    'LoadedModel',
    'VisualizeError',
    'attention_figure',
    'describe_model',
    'default_class_names',
    'load_class_names',
    'load_noah_model',
    'main',
    'preprocess_images',
    'write_attention_figures',
]

ImageLike = Union[str, os.PathLike, 'PIL.Image.Image']

_BATCH = 16
COLORBAR_WIDTH = 0.9  # inches added to a figure's width for the rows' colour bars


# ----------------------------------------------------------------------------------------------
# class names

def load_class_names(path: Union[str, os.PathLike]) -> List[str]:
    """Class names from a text file, one per line (blank lines ignored), in class-index order."""
    with open(path, encoding='utf-8') as f:
        names = [line.strip() for line in f]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f'class names file {path} is empty.')
    return names


def default_class_names(num_classes: int) -> Optional[List[str]]:
    """Human-readable ImageNet names from the label files shipped inside timm, if `num_classes`
    is the size of an ImageNet label set timm knows (1000 for ImageNet-1k); otherwise None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset({'num_classes': num_classes})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    # 'great white shark, white shark, man-eater, ...' -> 'great white shark'
    return [d.split(',')[0].strip() for d in info.label_descriptions()]


def _label(class_names: Optional[Sequence[str]], index: int) -> str:
    if class_names is not None and 0 <= index < len(class_names):
        # a folder name that is not UTF-8 reaches Python with surrogate escapes, which no font draws:
        # show its undecodable bytes as \xNN
        name = str(class_names[index]).encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
        return name if name == str(index) else f'{name} ({index})'
    return f'class {index}'


# ----------------------------------------------------------------------------------------------
# images

def _data_config(model: nn.Module, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's eval data config for `model` at the size it was built for; `overrides` (crop_pct, mean,
    std, interpolation; None values ignored) win over the model's pretrained cfg."""
    from timm.data import resolve_data_config
    # the pretrained cfg keeps its 224 px input size when the model was built for another size
    args = {key: value for key, value in (overrides or {}).items() if value not in (None, '')}
    args.setdefault('input_size', model_input_size(model))  # a CNN records the size it was trained at
    in_chans = args['input_size'][0]
    cfg = resolve_data_config(args, model=model)
    cfg['mean'] = _channel_stats(cfg['mean'], in_chans)
    cfg['std'] = _channel_stats(cfg['std'], in_chans)
    return cfg


def _channel_stats(values: Sequence[float], in_chans: int) -> Tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    return (values[0],) * in_chans if len(values) == 1 else values


def preprocess_images(
        model: nn.Module,
        images: Sequence[ImageLike],
        transform=None,
        data_config: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """Open image files (or take PIL images) and apply the model's eval transform -> (B, C, H, W).

    The default transform is timm's `create_transform` for the model's data config (resize by
    crop_pct, center crop to the size the model was built for, normalise with its mean/std);
    `data_config` entries (crop_pct, mean, std, interpolation) override the model's.
    """
    from PIL import Image
    in_chans = model_input_size(model)[0]
    if transform is None:
        from timm.data import create_transform
        transform = create_transform(**_data_config(model, data_config), is_training=False)
    tensors = []
    for img in images:
        if not isinstance(img, Image.Image):
            with Image.open(img) as opened:
                img = opened.convert('L' if in_chans == 1 else 'RGB')
        else:
            img = img.convert('L' if in_chans == 1 else 'RGB')
        tensors.append(transform(img))
    return torch.stack(tensors)


def _to_display(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation: (B, C, H, W) model input -> (B, H, W, C) floats in [0, 1]."""
    C = images.shape[1]
    mean_t = torch.tensor(_channel_stats(mean, C), dtype=torch.float32).view(1, C, 1, 1)
    std_t = torch.tensor(_channel_stats(std, C), dtype=torch.float32).view(1, C, 1, 1)
    pixels = (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return pixels.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------
# figures

def attention_figure(
        image: np.ndarray,
        att: NoahAttention,
        index: int = 0,
        class_names: Optional[Sequence[str]] = None,
        title: Optional[str] = None,
        cmap: str = 'turbo',
        alpha: float = 0.5,
):
    """A matplotlib Figure (Agg canvas) for image `index` of `att`.

    Rows: the classes of `att.classes[index]` with their probability; columns: the image, each
    group's attention map and the mean over groups, bilinearly upsampled to the image and overlaid.
    Maps are drawn in multiples of a uniform map (weight x L, so 1 means "no preference"); all maps
    of a row share one colour scale, from 0 to the row's highest weight, shown by the row's colour
    bar, so a flat map looks flat. Each group's panel says its peak ("35x a uniform map") and what
    that group adds to the class logit (sum_l a*v); the mean column's peak is the mean map's, and
    its logit is the sum of the groups' parts, which is the class logit.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = att.maps[index].float().cpu()  # (N, k, H', W')
    values = att.values[index].float().cpu()
    classes = att.classes[index].cpu()
    probs = att.logits[index].float().softmax(-1).cpu()
    N, k, gh, gw = maps.shape
    L = gh * gw
    H, W = image.shape[:2]
    contrib = (maps * values).sum((-1, -2))  # (N, k): each group's share of the logit
    mean_map = maps.mean(0)  # (k, H', W'), still sums to 1
    panels = torch.cat([maps, mean_map[None]], 0)  # (N + 1, k, H', W')
    up = F.interpolate(panels.reshape(-1, 1, gh, gw), size=(H, W), mode='bilinear', align_corners=False)
    up = up.reshape(N + 1, k, H, W).numpy()

    gray = image.shape[-1] == 1
    shown = image[..., 0] if gray else image
    ncols = N + 2
    size = 2.0
    fig = Figure(figsize=(size * ncols + COLORBAR_WIDTH, size * k + 0.8), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(k, ncols, squeeze=False)
    for row in range(k):
        c = int(classes[row])
        ax = axes[row, 0]
        ax.imshow(shown, cmap='gray' if gray else None, vmin=0, vmax=1, interpolation='nearest')
        ax.set_ylabel(f'{_label(class_names, c)}\np = {probs[c]:.1%}', fontsize=9)
        if row == 0:
            ax.set_title('input', fontsize=9)
        row_max = max(float(panels[:, row].max()) * L, 1e-12)  # in multiples of a uniform map
        for col in range(N + 1):
            ax = axes[row, col + 1]
            ax.imshow(shown, cmap='gray' if gray else None, vmin=0, vmax=1, interpolation='nearest')
            peak = float(panels[col, row].max()) * L
            overlay = ax.imshow(up[col, row] * L, cmap=cmap, alpha=alpha, vmin=0, vmax=row_max,
                                interpolation='nearest')
            if col < N:
                words = f'peak {_times(peak)} a uniform map\nadds {float(contrib[col, row]):+.2f} to the logit'
            else:
                words = (f'peak {_times(peak)} a uniform map\nlogit {float(contrib[:, row].sum()):+.2f} '
                         f'= sum of the {N} groups')
            ax.text(0.02, 0.02, words, transform=ax.transAxes, fontsize=7, color='white', va='bottom',
                    bbox=dict(facecolor='black', alpha=0.55, pad=1.5, edgecolor='none'))
            if row == 0:
                ax.set_title(f'group {col + 1}' if col < N else f'mean of {N} groups', fontsize=9)
        bar = fig.colorbar(overlay, ax=list(axes[row, 1:]), fraction=0.04, pad=0.01, aspect=12)
        bar.solids.set_alpha(1)
        bar.set_label('x a uniform map', fontsize=8)
        bar.ax.tick_params(labelsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or 'NOAH attention per class and group', fontsize=10)
    return fig


def _times(ratio: float) -> str:
    """35.2 -> '35x', 1.46 -> '1.5x': how many times a uniform map's weight, in plain words."""
    return f'{ratio:.0f}x' if ratio >= 10 else f'{ratio:.1f}x'


def describe_model(model: nn.Module) -> str:
    """The model's name and the settings it was actually built with (input size, token grid, NOAH N
    and r, classes), which for a customised model differ from what the registry name suggests."""
    head = noah_head_of(model)
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    _, H, W = model_input_size(model)
    gh, gw = token_grid(model)
    split = '' if head.kv_split and head.head_split else (
        ', ' + ', '.join(t for t, off in (('keys = values', not head.kv_split), ('dense', not head.head_split)) if off))
    return (f'{name} ({H}x{W} px, {gh}x{gw} tokens, N={head.num_heads} groups, r={head.key_ratio:g}{split}, '
            f'{head.num_classes} classes)')


def _unique_stem(name: str, used: Dict[str, int]) -> str:
    stem = ''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in name) or 'image'
    n = used.get(stem, 0)
    used[stem] = n + 1
    return stem if n == 0 else f'{stem}_{n}'


def write_attention_figures(
        model: nn.Module,
        images: Union[torch.Tensor, Sequence[ImageLike]],
        out_dir: Union[str, os.PathLike],
        class_names: Optional[Sequence[str]] = None,
        topk: int = 3,
        names: Optional[Sequence[str]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        transform=None,
        title: Optional[str] = None,
        data_config: Optional[Dict[str, Any]] = None,
) -> List[Path]:
    """Write one attention PNG per image into `out_dir`; return their paths.

    Args:
        model: a NOAH model (its train/eval state is left as found).
        images: image files / PIL images (preprocessed with the model's eval transform, or
            `transform`), or a (B, C, H, W) tensor already preprocessed for the model.
        class_names: names in class-index order; default: ImageNet names for ImageNet-sized
            heads (1000 classes), otherwise class indices.
        topk: rows per figure, the image's highest-scoring classes.
        names: file name stems (default: the image files' stems, or image_000, ...).
        mean, std: the normalisation to undo for display (default: the model's data config).
        title: prefix of each figure's title (default: the model's name and the settings it was
            built with, `describe_model`).
        data_config: overrides of the model's eval preprocessing (crop_pct, mean, std, interpolation),
            e.g. those the model was trained with.
    """
    head = noah_head_of(model)
    token_grid(model)
    topk = max(1, min(int(topk), head.num_classes))
    if class_names is None:
        class_names = default_class_names(head.num_classes)
    elif len(class_names) != head.num_classes:
        raise ValueError(f'{len(class_names)} class names given for a model with {head.num_classes} classes.')

    if isinstance(images, torch.Tensor):
        batch = images
        default_names = [f'image_{i:03d}' for i in range(batch.shape[0])]
    else:
        images = list(images)
        batch = None
        default_names = [Path(img).stem if isinstance(img, (str, os.PathLike)) else f'image_{i:03d}'
                         for i, img in enumerate(images)]
    names = list(names) if names is not None else default_names
    count = batch.shape[0] if batch is not None else len(images)
    if len(names) != count:
        raise ValueError(f'{len(names)} names given for {count} images.')
    if mean is None or std is None:
        cfg = _data_config(model, data_config)
        mean = cfg['mean'] if mean is None else mean
        std = cfg['std'] if std is None else std
    model_name = describe_model(model)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    used: Dict[str, int] = {}
    paths = []
    for start in range(0, count, _BATCH):
        if batch is not None:
            x = batch[start:start + _BATCH]
        else:
            x = preprocess_images(model, images[start:start + _BATCH], transform=transform, data_config=data_config)
        x = x.to(device=device, dtype=next(model.parameters()).dtype)
        att = noah_attention(model, x, topk=topk)
        shown = _to_display(x, mean, std)
        for i in range(x.shape[0]):
            stem = _unique_stem(names[start + i], used)
            fig = attention_figure(
                shown[i], att, i, class_names,
                title=f'{title or model_name}: {names[start + i]} - where each NOAH group looks for the top '
                      f'{topk} class{"es" if topk > 1 else ""}')
            path = out_dir / f'{stem}_attention.png'
            fig.savefig(path)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# command line

class VisualizeError(UserError, ValueError):
    """A user-facing problem (missing file, unknown model, weights that do not fit): one-line message."""


class LoadedModel(NamedTuple):
    """A NOAH model with its weights, the class names that go with them and the eval preprocessing
    it was trained with (crop_pct, mean, std, interpolation; None = the model's default)."""
    model: nn.Module
    class_names: Optional[List[str]]
    data_config: Dict[str, Any]


def _read_checkpoint_meta(path: str) -> Dict[str, Any]:
    """The non-weight entries of a training checkpoint (class_names, args, ...); {} for bare weights."""
    if path.endswith(('.safetensors', '.npz', '.npy')):
        return {}
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise VisualizeError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a state dict')
    return {key: value for key, value in ckpt.items() if not isinstance(value, torch.Tensor)}


def _first_line(e: BaseException, limit: int = 400) -> str:
    """The message of `e` on one line (multi-line messages, e.g. load_state_dict's, are joined)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = '; '.join(lines) if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _state_dict_num_classes(path: str, num_heads: int) -> Optional[int]:
    from timm.models import load_state_dict
    try:
        state = load_state_dict(path, use_ema=False, weights_only=True)
    except Exception:
        return None
    # the head's value bias: head.value.bias (Mixer, DeiT), fc.value.bias (ResNet), classifier.value.bias, ...
    bias = next((v for k, v in state.items() if k.endswith('.value.bias') and k[:-10] + 'query.bias' in state), None)
    if bias is None or bias.ndim != 1 or bias.shape[0] % num_heads:
        return None
    return bias.shape[0] // num_heads


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='noah-visualize',
        description='Draw where a NOAH model looks for its top-k classes: one PNG per image with the '
                    'attention map of every group and their mean, overlaid on the image.')
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    p.add_argument('--model', required=True, help='registered NOAH model name, e.g. noah_gmlp_ti16_224')
    p.add_argument('--checkpoint', required=True, metavar='FILE',
                   help='weights: a timm training checkpoint (.pth / .pth.tar), a state dict or .safetensors')
    p.add_argument('--img-size', type=int, default=None,
                   help='input size the model was trained at (default: from the checkpoint, else the model default)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='classes of the checkpoint (default: from the checkpoint)')
    p.add_argument('--topk', type=int, default=3, help='classes (rows) per picture (default 3)')
    p.add_argument('--out', required=True, metavar='DIR', help='folder for the PNG files')
    p.add_argument('--crop-pct', type=float, default=None,
                   help='center-crop fraction (default: from the checkpoint\'s training args, else the model cfg)')
    p.add_argument('--class-names', metavar='FILE', default=None, help='class names, one per line')
    p.add_argument('--use-ema', action='store_true', help='use the EMA weights of a training checkpoint')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help='extra architecture arguments for timm.create_model (e.g. patch_size=8)')
    p.add_argument('--device', default='cpu', help='torch device (default cpu)')
    return p


def load_noah_model(
        model_name: str,
        checkpoint: str,
        img_size: Optional[int] = None,
        num_classes: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        class_names_file: Optional[str] = None,
        use_ema: bool = False,
        device: Union[str, torch.device] = 'cpu',
) -> LoadedModel:
    """Create `model_name` and load `checkpoint` into it (timm's loader, weights_only, strict).

    Architecture and preprocessing come from the checkpoint's training args when it is a timm-style
    training checkpoint (`args.model_kwargs`, `img_size`, `num_classes`, `in_chans`, `crop_pct`, ...);
    explicit arguments win. Class names: `class_names_file`, else the checkpoint's `class_names`,
    else None (`write_attention_figures` then uses ImageNet names for 1000 classes, or indices).
    Raises VisualizeError (a ValueError) with a one-line message for anything the user can fix.
    """
    import timm
    from . import models as _models  # noqa: F401  (registers the NOAH models)

    if not os.path.isfile(checkpoint):
        raise VisualizeError(f'checkpoint not found: {checkpoint}')
    if not timm.is_model(model_name):
        create_model_checked(model_name)  # raises with the closest registered names

    meta = _read_checkpoint_meta(checkpoint)
    train_args = meta.get('args')
    train_args = vars(train_args) if isinstance(train_args, argparse.Namespace) else (
        train_args if isinstance(train_args, dict) else {})

    class_names = None
    if class_names_file:
        try:
            class_names = load_class_names(class_names_file)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise VisualizeError(f'cannot read class names from {class_names_file}: {_first_line(e)}') from None
    elif isinstance(meta.get('class_names'), (list, tuple)) and meta['class_names']:
        class_names = [str(n) for n in meta['class_names']]

    kwargs = dict(train_args.get('model_kwargs') or {})
    kwargs.update(model_kwargs or {})
    img_size = img_size or train_args.get('img_size')
    if img_size:
        kwargs['img_size'] = img_size
    if train_args.get('in_chans') and 'in_chans' not in kwargs:
        kwargs['in_chans'] = train_args['in_chans']
    num_classes = num_classes or train_args.get('num_classes') or (len(class_names) if class_names else None)
    if num_classes is None:
        num_classes = _state_dict_num_classes(checkpoint, kwargs.get('noah_head_num', 4))
    if num_classes:
        kwargs['num_classes'] = num_classes

    try:
        # create_model_checked: models without img_size (CNNs) take any input size
        model = create_model_checked(model_name, noah_head=bool(train_args.get('noah_head')), **kwargs)
    except Exception as e:
        raise VisualizeError(f'cannot create {model_name} with {kwargs}: {_first_line(e)}') from None
    try:
        head = noah_head_of(model)
    except TypeError as e:
        raise VisualizeError(_first_line(e)) from None
    if class_names is not None and len(class_names) != head.num_classes:
        raise VisualizeError(f'{len(class_names)} class names for a model with {head.num_classes} classes')
    try:
        from timm.models import load_checkpoint
        from .models._twins import remap_checkpoint
        load_checkpoint(model, checkpoint, use_ema=use_ema, strict=True, weights_only=True, filter_fn=remap_checkpoint)
    except Exception as e:
        raise VisualizeError(f'cannot load {checkpoint} into {model_name} '
                             f'({head.num_classes} classes): {_first_line(e)}') from None
    try:
        model = model.to(device)
    except Exception as e:
        raise VisualizeError(f'cannot use device {device!r}: {_first_line(e)}') from None
    model.eval()
    # preprocess as the model was trained/validated (timm's training args)
    data_config = {key: train_args.get(key) for key in ('crop_pct', 'mean', 'std', 'interpolation')}
    if img_size:
        data_config['input_size'] = (model_input_size(model)[0], int(img_size), int(img_size))
    return LoadedModel(model, class_names, data_config)


def _run(args: argparse.Namespace) -> List[Path]:
    if args.topk < 1:
        raise VisualizeError(f'--topk must be at least 1, got {args.topk}')
    for img in args.images:
        if not os.path.isfile(img):
            raise VisualizeError(f'image not found: {img}')
    loaded = load_noah_model(
        args.model, args.checkpoint, img_size=args.img_size, num_classes=args.num_classes,
        model_kwargs=args.model_kwargs, class_names_file=args.class_names,
        use_ema=args.use_ema, device=args.device)

    from PIL import Image, UnidentifiedImageError
    for img in args.images:
        try:
            with Image.open(img) as opened:
                opened.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise VisualizeError(f'cannot read image {img}: {_first_line(e)}') from None
    data_config = dict(loaded.data_config)
    if args.crop_pct is not None:
        data_config['crop_pct'] = args.crop_pct
    return write_attention_figures(
        loaded.model, args.images, args.out, class_names=loaded.class_names,
        topk=min(args.topk, noah_head_of(loaded.model).num_classes), data_config=data_config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `noah-visualize` / `python -m noah_mlp.visualize`; returns the exit status."""
    args = _build_parser().parse_args(argv)

    def run() -> int:
        for path in _run(args):
            print(path)
        return 0

    return cli_main(run)


if __name__ == '__main__':
    sys.exit(main())
