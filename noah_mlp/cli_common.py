"""Pieces the training and validation tools share: model creation with clear errors, device and
AMP selection, logging."""
import contextlib
import difflib
import logging
import sys
from typing import Any, Dict, Optional

import torch
import timm

from .checkpoint import check_compatible, extract_state_dict, safe_load
from .errors import UserError

__all__ = [
    'create_model_checked', 'is_mixer_family', 'load_initial_weights', 'resolve_device', 'amp_autocast', 'setup_logging',
]

_logger = logging.getLogger('noah_mlp')


def is_mixer_family(model_name: str) -> bool:
    """True for MLP-Mixer / ResMLP / gMLP models (timm's mlp_mixer module and our noah_* models)."""
    import noah_mlp.models  # noqa: F401  (registers the models)
    try:
        fn = timm.models.model_entrypoint(model_name)
    except (RuntimeError, KeyError):
        return False
    return fn.__module__ in ('timm.models.mlp_mixer', 'noah_mlp.models.mlp_mixer')


def create_model_checked(
        model_name: str, pretrained_path: Optional[str] = None, adapt_pretrained_head: bool = True, **kwargs: Any,
) -> torch.nn.Module:
    """timm.create_model, refusing an unknown name with close registered names as suggestions.

    `pretrained_path` loads a file as the pretrained weights (timm's --pretrained-path); with
    `adapt_pretrained_head` its classifier is dropped and the model's own head starts fresh, as in
    timm's train.py (validation keeps it where the class count matches).
    """
    import noah_mlp.models  # noqa: F401
    if not model_name:
        raise UserError('no model given: pass --model NAME (e.g. --model noah_gmlp_ti16_224).')
    base = model_name.split(':')[-1].split('.')[0]
    if ':' not in model_name and not timm.is_model(base):
        names = timm.list_models()
        close = difflib.get_close_matches(base, names, n=5, cutoff=0.6)
        if not close:
            close = [n for n in names if base.lower() in n][:5]
        hint = f' Close registered names: {", ".join(close)}.' if close else ''
        raise UserError(f"unknown model '{model_name}'.{hint} (`timm.list_models('noah_*')` lists the NOAH models.)")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if pretrained_path:
        kwargs.update(_pretrained_path_kwargs(pretrained_path, adapt_pretrained_head))
    try:
        model = timm.create_model(model_name, **kwargs)
    except TypeError as e:
        if 'img_size' in kwargs and 'img_size' in str(e):
            # models without an img_size argument (CNNs) take any input size
            kwargs.pop('img_size')
            return create_model_checked(model_name, pretrained_path, adapt_pretrained_head, **kwargs)
        raise UserError(f"model '{model_name}' does not accept these settings ({e}).") from None
    except ValueError as e:
        raise UserError(f"cannot build model '{model_name}': {e}") from None
    except (OSError, RuntimeError) as e:
        if kwargs.get('pretrained'):
            raise _pretrained_error(model_name, e) from None
        raise
    if pretrained_path:  # the weights are loaded: drop the config's reference to them
        model.pretrained_cfg.pop('state_dict', None)
    return model


def _pretrained_path_kwargs(path: str, adapt_head: bool) -> Dict[str, Any]:
    """timm's `--pretrained-path`: the file's weights as the model's pretrained weights, head adapted.

    Read here with `safe_load` (this package's training checkpoints hold their arguments, which
    timm's loader refuses) and handed to timm as an in-memory `state_dict` source; num_classes=-1
    makes timm drop the file's classifier, as timm's train.py does.
    """
    overlay: Dict[str, Any] = dict(state_dict=extract_state_dict(safe_load(path), use_ema=True, path=path))
    if adapt_head:
        overlay['num_classes'] = -1
    return dict(pretrained=True, pretrained_cfg_overlay=overlay)


def _pretrained_error(model_name: str, error: BaseException) -> UserError:
    """One line for pretrained weights that cannot be had: none published, offline, not cached, bad file."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    try:
        cfg = timm.models.get_pretrained_cfg(model_name.split(':')[-1])
    except (RuntimeError, KeyError):
        cfg = None
    source = cfg and (cfg.hf_hub_id or cfg.url)
    if not source:
        tagged = timm.list_pretrained(model_name.split('.')[0] + '*')
        hint = f' Tags with weights: {", ".join(tagged)}.' if tagged else ''
        return UserError(f"no pretrained weights for '{model_name}' ({detail}).{hint} Pass --pretrained-path FILE "
                         f"(or pretrained_cfg_overlay=dict(file=FILE)) with a timm checkpoint of its linear-head "
                         f"sibling, or train from scratch.")
    fetch = (f'huggingface-cli download {cfg.hf_hub_id}' if cfg.hf_hub_id else f'download {cfg.url}')
    return UserError(f"cannot load the pretrained weights of '{model_name}' from {source} ({detail}). "
                     f"Without network access, fetch them once where there is one (`{fetch}` fills the Hugging Face "
                     f"cache; copy it to HF_HOME here), or pass --pretrained-path FILE with a local copy.")


def load_initial_weights(model: torch.nn.Module, path: str, arch: str = '') -> None:
    """`--initial-checkpoint`: the file's weights, strictly; a stock timm checkpoint gives a NOAH model its backbone."""
    from .models.mlp_mixer import NoahMlpMixer, noah_checkpoint_filter_fn
    state_dict = extract_state_dict(safe_load(path), use_ema=True, path=path)
    if isinstance(model, NoahMlpMixer):
        state_dict = noah_checkpoint_filter_fn(state_dict, model)
    check_compatible(model, state_dict, path, arch)
    model.load_state_dict(state_dict)


def resolve_device(requested: Optional[str]) -> str:
    """'auto' (or empty) picks CUDA when present, else CPU; anything else is checked."""
    if not requested or requested == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    kind = requested.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device '{requested}' requested but CUDA is not available on this machine.")
    return requested


def amp_autocast(device: torch.device, enabled: bool, dtype_name: str):
    """A context factory for autocast (or a no-op), with a clear refusal for unsupported dtypes."""
    if not enabled:
        return contextlib.nullcontext
    dtypes = {'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if dtype_name not in dtypes:
        raise UserError(f"--amp-dtype must be bfloat16 or float16, got '{dtype_name}'.")
    dtype = dtypes[dtype_name]
    if device.type == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError('--amp-dtype bfloat16 is not supported by this GPU; use --amp-dtype float16.')

    def _ctx():
        return torch.autocast(device_type=device.type, dtype=dtype)
    return _ctx


def setup_logging(primary: bool, level: int = logging.INFO) -> None:
    """Log lines of this package to stdout on the primary process; other ranks log warnings and errors only."""
    logger = logging.getLogger('noah_mlp')
    for h in list(logger.handlers):
        if getattr(h, '_noah_mlp', False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter('%(message)s'))
    handler._noah_mlp = True
    logger.addHandler(handler)
    logger.setLevel(level if primary else logging.WARNING)
    logger.propagate = False
