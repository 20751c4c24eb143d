"""Pieces the training and validation tools share: model creation with clear errors, device and
AMP selection, logging."""
import contextlib
import difflib
import importlib
import logging
import numbers
import os
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import timm
from timm.data import resolve_data_config
from timm.layers import PatchEmbed

from .checkpoint import check_compatible, extract_state_dict, safe_load
from .errors import UserError

__all__ = [
    'create_model_checked', 'is_mixer_family', 'load_initial_weights', 'resolve_device', 'resolve_data_config_checked',
    'amp_autocast', 'setup_logging', 'cpu_cores', 'threads_per_process', 'default_loader_workers',
    'add_precision_args', 'prepare_runtime',
]

# model arguments that count something (pixels, channels, blocks, groups): a value below 1 cannot build a model
_COUNT_ARGS = ('img_size', 'patch_size', 'embed_dim', 'num_blocks', 'depth', 'num_heads', 'in_chans',
               'noah_head_num', 'mlp_ratio')

_logger = logging.getLogger('noah_mlp')


def is_mixer_family(model_name: str) -> bool:
    """True for MLP-Mixer / ResMLP / gMLP models (timm's mlp_mixer module and our noah_* models)."""
    import noah_mlp.models  # noqa: F401  (registers the models)
    try:
        fn = timm.models.model_entrypoint(model_name)
    except (RuntimeError, KeyError):
        return False
    return fn.__module__ in ('timm.models.mlp_mixer', 'noah_mlp.models.mlp_mixer')


def _check_model_kwargs(model_name: str, kwargs: Dict[str, Any]) -> None:
    """Refuse counts below 1 and rates outside [0, 1) before timm builds (or half-builds) the model."""
    for key, value in kwargs.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        numbers_only = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
        if key in _COUNT_ARGS and numbers_only and not all(v > 0 for v in values):
            raise UserError(f"model '{model_name}': {key} must be positive, got {value!r}.")
        if key.endswith('_rate') and numbers_only and not all(0 <= v < 1 for v in values):
            raise UserError(f"model '{model_name}': {key} must be a rate in [0, 1), got {value!r}.")


def _patch_embed(model: torch.nn.Module) -> Optional[PatchEmbed]:
    for name in ('stem', 'patch_embed'):
        module = getattr(model, name, None)
        if isinstance(module, PatchEmbed):
            return module
    return None


def _check_patch_grid(model_name: str, model: torch.nn.Module) -> None:
    embed = _patch_embed(model)
    if embed is not None and embed.grid_size is not None and min(embed.grid_size) < 1:
        size = 'x'.join(map(str, embed.img_size))
        raise UserError(f"model '{model_name}': a {size} px image is smaller than its patch size "
                        f"{'x'.join(map(str, embed.patch_size))}: raise --img-size or lower patch_size.")


def create_model_checked(
        model_name: str, noah_head: bool = False, pretrained_path: Optional[str] = None,
        adapt_pretrained_head: bool = True, **kwargs: Any,
) -> torch.nn.Module:
    """timm.create_model with every failure caused by the arguments turned into one clear UserError.

    An unknown name gets close registered names as suggestions; impossible architecture values
    (counts below 1, rates outside [0, 1), an image smaller than a patch) and unreachable
    pretrained weights are named. `noah_head=True` builds timm model `model_name` with its
    classifier replaced by a NOAH head (`noah_mlp.add_noah_head`, through the `with_noah_head`
    entrypoint that config.json files name). `pretrained_path` loads a file as the pretrained
    weights (timm's --pretrained-path); with `adapt_pretrained_head` its classifier is dropped and
    the model's own head starts fresh, as in timm's train.py (validation keeps a head that fits).
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
    if noah_head:
        if base.startswith('noah_'):
            raise UserError(f'--noah-head: {model_name} already has a NOAH head; leave the flag out.')
        return create_model_checked('with_noah_head', pretrained_path=pretrained_path,
                                    adapt_pretrained_head=adapt_pretrained_head, backbone=model_name, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    _check_model_kwargs(model_name, kwargs)
    if pretrained_path:
        kwargs.update(_pretrained_path_kwargs(pretrained_path, adapt_pretrained_head))
    try:
        model = timm.create_model(model_name, **kwargs)
    except TypeError as e:
        if 'img_size' in kwargs and 'img_size' in str(e):
            # models without an img_size argument (CNNs) take any input size
            kwargs.pop('img_size')
            return create_model_checked(model_name, noah_head, pretrained_path, adapt_pretrained_head, **kwargs)
        raise UserError(f"model '{model_name}' does not accept these settings ({e}).") from None
    except (OSError, RuntimeError) as e:
        if not kwargs.get('pretrained'):
            raise _build_error(model_name, e) from None
        raise _pretrained_error(model_name, e) from None
    except (ValueError, ZeroDivisionError, AssertionError) as e:
        raise _build_error(model_name, e) from None
    if pretrained_path:  # the weights are loaded: drop the config's reference to them
        model.pretrained_cfg.pop('state_dict', None)
    _check_patch_grid(model_name, model)
    return model


def _build_error(model_name: str, e: BaseException) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"cannot build model '{model_name}' with these settings: {first}")


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
    """`--initial-checkpoint`: the file's weights, strictly, in any layout `remap_checkpoint` reads (the NOAH
    authors' included); a stock timm checkpoint gives a NOAH model its backbone."""
    from .models._twins import remap_checkpoint
    state_dict = remap_checkpoint(extract_state_dict(safe_load(path), use_ema=True, path=path), model, new_head=True)
    check_compatible(model, state_dict, path, arch)
    model.load_state_dict(state_dict)


def _fixed_input_size(model: torch.nn.Module) -> Optional[Tuple[int, int]]:
    """(H, W) a model's patch embedding insists on (timm's strict_img_size), else None."""
    embed = _patch_embed(model)
    if embed is None or embed.img_size is None or not embed.strict_img_size or embed.dynamic_img_pad:
        return None
    return tuple(embed.img_size)


def resolve_data_config_checked(args: Dict[str, Any], model: torch.nn.Module, model_name: str = '',
                                use_test_size: bool = False) -> Dict[str, Any]:
    """timm's resolve_data_config, refusing an input size the model cannot take (fixed-size patch models)."""
    config = resolve_data_config(args, model=model, use_test_size=use_test_size, verbose=False)
    fixed = _fixed_input_size(model)
    height, width = config['input_size'][1:]
    if fixed is not None and (height, width) != fixed:
        name = model_name or type(model).__name__
        raise UserError(
            f"model '{name}' takes {fixed[0]}x{fixed[1]} px inputs (its token mixing is built for a fixed number "
            f"of patches), but the input size is {height}x{width}: give one size with --img-size.")
    return config


def resolve_device(requested: Optional[str]) -> str:
    """'auto' (or empty) picks CUDA when present, else CPU; anything else is checked."""
    if not requested or requested == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    kind = torch.device(requested).type
    if kind == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device '{requested}' requested but CUDA is not available on this machine.")
    if kind == 'mps':
        available = torch.backends.mps.is_available()
    else:
        backend = getattr(torch, kind, None)
        available = kind == 'cpu' or bool(getattr(backend, 'is_available', lambda: False)())
    if not available:
        raise UserError(f"device '{requested}' requested but it is not available on this machine.")
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


def cpu_cores() -> int:
    """CPU cores this process may run on: its affinity mask (what a container, taskset or Slurm grants)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(nproc: int, inherited: Optional[str] = None) -> Tuple[int, Optional[str]]:
    """OMP / intra-op threads for each of `nproc` processes sharing this machine's cores.

    An inherited OMP_NUM_THREADS is kept unless `nproc` processes with that many threads each
    would oversubscribe the cores (2 processes x 2 threads on 2 cores ran the demo 5.6x slower);
    then each process gets cores // nproc. Returns (threads, a one-line note when it overrode).
    """
    cores, nproc = cpu_cores(), max(1, nproc)
    fair = max(1, cores // nproc)
    try:
        asked = int(inherited) if inherited not in (None, '') else None
    except ValueError:
        asked = None
    if asked is None or asked < 1:
        return fair, None if inherited in (None, '') else (
            f'OMP_NUM_THREADS={inherited!r} is not a positive number: using {fair} thread(s) per process.')
    if asked * nproc <= cores:
        return asked, None
    return fair, (f'OMP_NUM_THREADS={asked} inherited would run {asked * nproc} threads on {cores} core(s) with '
                  f'{nproc} process(es): using {fair} thread(s) per process.')


def default_loader_workers(env: Optional[Mapping[str, str]] = None) -> int:
    """Default data-loader workers per process: timm's 4 where the cores allow, fewer on small machines.

    Each process of a node (LOCAL_WORLD_SIZE, set by torchrun) gets cores // processes cores; its
    workers take all but one of them (the training loop keeps one), at most 4. On 2 cores that is
    1 worker for one process and 0 (loading in the main process) for two, instead of PyTorch's
    warning about more workers than cores.
    """
    env = os.environ if env is None else env
    try:
        local_procs = max(1, int(env.get('LOCAL_WORLD_SIZE', '1')))
    except ValueError:
        local_procs = 1
    return min(4, max(0, cpu_cores() // local_procs - 1))


def add_precision_args(group) -> None:
    """The device-side flags train.py and validate.py share: AMP, model dtype, fast norm, device modules."""
    group.add_argument('--amp', action='store_true', default=False, help='automatic mixed precision')
    group.add_argument('--amp-dtype', default=None, choices=['bfloat16', 'float16'],
                       help='AMP dtype (default: float16 on CUDA, bfloat16 on CPU)')
    group.add_argument('--model-dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                       help='weights and inputs in this dtype, without AMP; float32 when not given')
    group.add_argument('--fast-norm', action='store_true', default=False,
                       help="timm's experimental fast LayerNorm / GroupNorm paths (set_fast_norm)")
    group.add_argument('--device-modules', default=None, nargs='+', metavar='MODULE',
                       help='Python modules to import first (out-of-tree device backends)')


def prepare_runtime(args: Any) -> Optional[torch.dtype]:
    """Import --device-modules, apply --fast-norm; return --model-dtype as a dtype (refused together with AMP)."""
    for module in args.device_modules or []:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"--device-modules: cannot import '{module}' ({e}).") from None
    if args.fast_norm:
        from timm.layers import set_fast_norm
        set_fast_norm()
    dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    if dtype not in (None, torch.float32) and args.amp:
        raise UserError('--model-dtype and --amp exclude each other: AMP keeps float32 weights.')
    return dtype
