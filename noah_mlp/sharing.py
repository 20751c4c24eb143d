"""Sharing and deploying NOAH models: timm / Hugging Face folders and ONNX.

A NOAH model travels like any timm model. `save_pretrained_folder` writes the folder timm's
`create_model('local-dir:DIR', pretrained=True)` (and, once uploaded, `'hf-hub:USER/REPO'`) reads:
`model.safetensors` plus a `config.json` whose `model_args` rebuild the exact architecture
(noah_head_num, key_ratio, img_size, ...) and whose `label_names` name the classes.
`export_onnx` / `check_onnx` export a model in eval mode with a dynamic batch dimension and compare
onnxruntime against PyTorch (needs the `onnx` extra: `pip install "noah-mlp[onnx]"`).
"""
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.utils import unwrap_model

_logger = logging.getLogger(__name__)

__all__ = ['save_pretrained_folder', 'export_onnx', 'check_onnx', 'model_input_size']

PathLike = Union[str, Path]

# ONNX keeps weights inside the .onnx file below this size; protobuf refuses files over 2 GiB.
_INLINE_WEIGHTS_LIMIT = 1 << 30


def _noah_head_args(model: nn.Module) -> Dict[str, Any]:
    """The NOAH head settings of `model`, read from the model itself (they fix the head's shapes)."""
    from .models import NoahMlpMixer
    if not isinstance(model, NoahMlpMixer):
        return {}
    return dict(
        noah_head_num=int(model.noah_head_num),
        key_ratio=float(model.key_ratio),
        head_split=bool(model.head_split),
        kv_split=bool(model.kv_split),
    )


def save_pretrained_folder(
        model: nn.Module,
        out_dir: PathLike,
        label_names: Optional[Union[Sequence[str], Mapping[int, str]]] = None,
        model_args: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write `out_dir/model.safetensors` + `out_dir/config.json` for timm's local-dir / hf-hub loading.

    A thin layer over `timm.models.save_for_hf(model, out_dir, safe_serialization=True)`, which on
    its own already writes a folder that rebuilds a NOAH model with its non-default settings. This
    also unwraps compiled / DDP / EMA models, records `label_names` (one name per class, index
    order, e.g. a dataset's `classes`; fewer names than classes are written as {index: name})
    and spells out the NOAH head settings in `model_args`.
    `model_args` adds JSON-serialisable reconstruction arguments of your own. Drop rates are not
    recorded (timm's convention): pass e.g. `head_drop_rate=` again when fine-tuning.

    Reload with `timm.create_model(f'local-dir:{out_dir}', pretrained=True)` after `import noah_mlp`;
    add `num_classes=K` to keep the backbone and start a fresh head.
    """
    try:
        from timm.models import save_for_hf
    except ImportError:  # timm releases that do not re-export it
        from timm.models._hub import save_for_hf

    model = unwrap_model(model)
    if not isinstance(getattr(model, 'pretrained_cfg', None), dict):
        raise ValueError(
            'save_pretrained_folder needs a model built by timm (timm.create_model or a registered '
            f'entrypoint), which carries a pretrained_cfg; got {type(model).__name__} without one.')
    model_config: Dict[str, Any] = {}
    if label_names is not None:
        num_classes = getattr(model, 'num_classes', None)
        if isinstance(label_names, Mapping):
            names: Union[list, dict] = {int(k): str(v) for k, v in label_names.items()}
            bad = [k for k in names if not 0 <= k < (num_classes or 0)]
            if bad:
                raise ValueError(f'label_names has class indices {bad} outside [0, {num_classes}).')
        else:
            if isinstance(label_names, str):
                raise ValueError('label_names must be a sequence of class names, not one string.')
            names = [str(n) for n in label_names]
            if len(names) > (num_classes or 0):
                raise ValueError(
                    f'label_names has {len(names)} names but the model has num_classes={num_classes}.')
            if names and len(names) < num_classes:
                # e.g. --num-classes above the dataset's class count: name the classes that have names
                _logger.warning(f'{len(names)} label names for {num_classes} classes; the rest stay unnamed.')
                names = dict(enumerate(names))
        if names:
            model_config['label_names'] = names
    args = dict(_noah_head_args(model), **(model_args or {}))
    try:
        from timm.models import get_model_args  # noqa: F401  (timm that writes recorded arguments itself)
    except ImportError:
        # older timm writes `model_args` only when given: pass what the factory / entrypoint recorded
        recorded = {k: v for k, v in getattr(model, '_model_args', {}).items()
                    if k not in ('drop_rate', 'drop_path_rate', 'drop_block_rate') and not k.endswith('_drop_rate')}
        recorded['num_classes'] = model.num_classes
        args = dict(recorded, **args)
    out_dir = Path(out_dir)
    save_for_hf(model, str(out_dir), model_config=model_config or None, model_args=args or None,
                safe_serialization=True)
    return out_dir


def model_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) the model takes now (its img_size / in_chans), not the size its source weights were made for."""
    model = unwrap_model(model)
    try:
        from timm.models import get_model_input_config  # timm releases that track the current input size
    except ImportError:
        get_model_input_config = None
    if get_model_input_config is not None:
        return tuple(int(v) for v in get_model_input_config(model)['input_size'])
    stem = getattr(model, 'stem', None)  # MlpMixer's PatchEmbed
    chans = getattr(model, 'in_chans', 3)
    if stem is not None and getattr(stem, 'img_size', None) is not None:
        return (int(chans), *(int(v) for v in stem.img_size))
    from timm.data import resolve_model_data_config
    return tuple(int(v) for v in resolve_model_data_config(model)['input_size'])


def _input_size(model: nn.Module, img_size: Optional[Union[int, Sequence[int]]]) -> Tuple[int, int, int]:
    chans, height, width = model_input_size(model)
    if img_size is not None:
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return int(chans), int(height), int(width)


def export_onnx(
        model: nn.Module,
        path: PathLike,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        opset: Optional[int] = None,
        dynamic_batch: bool = True,
        dynamo: bool = True,
) -> Path:
    """Export `model` in eval mode to ONNX: input `input` (B, C, H, W) -> output `logits` (B, K).

    `img_size` defaults to the model's own input size (MLP-Mixer / gMLP take one fixed size).
    With `dynamic_batch` the batch dimension is symbolic, so one file serves every batch size.
    `dynamo=True` uses PyTorch's torch.export-based exporter (its default; opset chosen by PyTorch
    unless `opset` is given), `dynamo=False` the legacy TorchScript exporter (deprecated by
    PyTorch, kept as a fallback). Weights are stored inside the .onnx file unless they exceed 1 GiB.
    The model's train/eval mode is restored afterwards. Check the result with `check_onnx`.
    """
    model = unwrap_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device('cpu')
    dtype = ref.dtype if ref is not None else torch.float32
    # batch 2: the torch.export-based exporter specialises a batch of 1 to a constant
    example = torch.randn(2, *_input_size(model, img_size), device=device, dtype=dtype)
    kwargs: Dict[str, Any] = dict(input_names=['input'], output_names=['logits'], opset_version=opset)
    if dynamo:
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        kwargs.update(dynamo=True, verbose=False, external_data=weight_bytes > _INLINE_WEIGHTS_LIMIT)
        if dynamic_batch:
            kwargs['dynamic_shapes'] = ({0: torch.export.Dim('batch')},)
    else:
        kwargs.update(dynamo=False, do_constant_folding=True)
        if dynamic_batch:
            kwargs['dynamic_axes'] = {'input': {0: 'batch'}, 'logits': {0: 'batch'}}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(path), **kwargs)
    finally:
        model.train(was_training)
    return path


def check_onnx(
        model: nn.Module,
        path: PathLike,
        batch_sizes: Sequence[int] = (1, 3),
        atol: float = 1e-4,
        seed: int = 0,
) -> float:
    """Run the ONNX file in onnxruntime (CPU) on random inputs and compare with `model` in eval mode.

    Returns the largest absolute logit difference over `batch_sizes`; raises RuntimeError if it
    exceeds `atol` or if an output has the wrong shape.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('check_onnx needs onnxruntime: pip install "noah-mlp[onnx]"') from e
    model = unwrap_model(model)
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device('cpu')
    dtype = ref.dtype if ref is not None else torch.float32
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    chans, height, width = session.get_inputs()[0].shape[1:]
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    worst = 0.
    try:
        for batch in batch_sizes:
            x = torch.randn(batch, chans, height, width, generator=generator, dtype=dtype)
            with torch.no_grad():
                expected = model(x.to(device)).float().cpu()
            got = torch.from_numpy(session.run(None, {input_name: x.numpy()})[0]).float()
            if got.shape != expected.shape:
                raise RuntimeError(f'ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)}.')
            worst = max(worst, (got - expected).abs().max().item())
    finally:
        model.train(was_training)
    if not worst <= atol:
        raise RuntimeError(f'ONNX logits differ from PyTorch by {worst:.3g} (> atol={atol}).')
    return worst
