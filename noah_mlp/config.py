"""Command line + YAML configuration with timm's train.py names.

``--config FILE`` (``-c``) sets defaults from a YAML mapping whose keys are the flags' destination
names (``batch_size`` for ``--batch-size``); flags given on the command line override it. An
unknown key is an error naming it. Keys that timm 1.x dropped and that configs written for timm
0.4/0.5 still carry (the upstream NOAH config does) are mapped or ignored with a note.

Values are checked once, at parse time, whatever their source: the flags' argparse types
(`positive_int`, `drop_rate`, ...) also convert and check the YAML values, and the parser's
`checks` (flags that must agree) run on the parsed namespace. A bad value is one UserError naming
the flag or key.
"""
import argparse
import ast
import difflib
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml
from timm.utils import ParseKwargs

from .errors import UserError

__all__ = [
    'ArgumentParser', 'HelpFormatter', 'parse_args_with_config', 'LEGACY_KEYS', 'args_to_yaml', 'KeyValueAction',
    'positive_int', 'non_negative_int', 'seed_int', 'positive_float', 'non_negative_float', 'probability',
    'drop_rate', 'area_fraction', 'device_name', 'compile_backend', 'augment_policy', 'INTERPOLATIONS', 'SCHEDULERS',
    'check_image_args',
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it says something (not None, False, '' or []), 110 columns wide."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=110)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, '', [], {}) or action.default is argparse.SUPPRESS:
            return action.help or ''
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (a UserError: exit status 2) and checks across flags.

    `checks` run on the parsed namespace, so values from the command line and from ``--config``
    YAML are checked the same way; each raises a UserError naming the flags.
    """

    def __init__(self, *args: Any, checks: Sequence[Callable[[argparse.Namespace], None]] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.checks = list(checks)

    def error(self, message):
        raise UserError(f'{message}  (see --help)')

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self.checks:
            check(namespace)
        return namespace, extras


# --------------------------------------------------------------------------------------------- value types
# argparse `type=` functions: a bad value is refused at parse time with the flag's name. YAML values
# go through the same functions (parse_args_with_config), so both sources obey the same rules.

def _integer(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise argparse.ArgumentTypeError(f'expected an integer, got {value!r}')
    try:
        return int(value)
    except (TypeError, ValueError):
        pass
    try:
        number = float(value)  # '1e3', '3.0'
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and number.is_integer():
        return int(number)
    raise argparse.ArgumentTypeError(f'expected an integer, got {value!r}')


def _real(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f'expected a number, got {value!r}') from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f'expected a finite number, got {value!r}')
    return number


def _ranged(convert: Callable[[Any], Any], ok: Callable[[Any], bool], what: str, name: str):
    def check(value: Any):
        number = convert(value)
        if not ok(number):
            raise argparse.ArgumentTypeError(f'must be {what}, got {value!r}')
        return number
    check.__name__ = name  # argparse names the type in some messages
    return check


positive_int = _ranged(_integer, lambda n: n >= 1, 'a positive integer', 'positive_int')
non_negative_int = _ranged(_integer, lambda n: n >= 0, 'an integer >= 0', 'non_negative_int')
seed_int = _ranged(_integer, lambda n: 0 <= n < 2 ** 32, 'an integer from 0 to 2**32 - 1', 'seed_int')
positive_float = _ranged(_real, lambda x: x > 0, 'a number > 0', 'positive_float')
non_negative_float = _ranged(_real, lambda x: x >= 0, 'a number >= 0', 'non_negative_float')
probability = _ranged(_real, lambda x: 0 <= x <= 1, 'a probability in [0, 1]', 'probability')
drop_rate = _ranged(_real, lambda x: 0 <= x < 1, 'a rate in [0, 1)', 'drop_rate')
area_fraction = _ranged(_real, lambda x: 0 < x <= 1, 'a fraction of the image in (0, 1]', 'area_fraction')

# timm 1.0.x names (timm.data.transforms, timm.scheduler.create_scheduler_v2)
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming')
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'constant', 'wsd', 'rsqrt', 'none')


def device_name(value: Any) -> str:
    """'auto' or a torch device string ('cpu', 'cuda', 'cuda:1', 'mps', ...); availability is checked later."""
    import torch
    text = str(value)
    if text == 'auto':
        return text
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r} (expected auto, cpu, cuda, cuda:N, mps, xpu, ...)") from None
    return text


def compile_backend(value: Any) -> str:
    """A torch.compile backend registered in this installation."""
    from torch._dynamo import list_backends
    text = str(value)
    if text not in list_backends(exclude_tags=()):  # debug and experimental backends count too
        raise argparse.ArgumentTypeError(
            f"unknown torch.compile backend {text!r} (e.g. {', '.join(sorted(list_backends()))})")
    return text


def augment_policy(value: Any) -> str:
    """A timm auto-augment string ('rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original', ...), tried by
    building its transform as timm's create_transform does."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    text = str(value)
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    build = rand_augment_transform if text.startswith('rand') else (
        augment_and_mix_transform if text.startswith('augmix') else auto_augment_transform)
    try:
        build(text, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise argparse.ArgumentTypeError(f'not a timm auto-augment policy {text!r} ({detail})') from None
    return text


def parse_key_values(items: Sequence[Any]) -> Dict[str, Any]:
    """KEY=VALUE items as a dict, values read as Python literals where they are one (else kept as text)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition('=')
        if not sep or not key.strip():
            raise ValueError(f'expected KEY=VALUE items, got {str(item)!r}')
        try:
            out[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key.strip()] = text
    return out


class KeyValueAction(ParseKwargs):
    """timm's ParseKwargs (``--model-kwargs num_blocks=2 ...``), refusing an item without ``=``."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_key_values(values))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def check_image_args(args: argparse.Namespace) -> None:
    """--in-chans, --input-size, --mean, --std and --input-img-mode must agree on the channel count.

    As in timm's train.py, an unset --input-img-mode follows the channel count (L for 1, RGB for 3).
    """
    from PIL import Image
    input_size = getattr(args, 'input_size', None)
    in_chans = getattr(args, 'in_chans', None)
    if input_size is not None and in_chans is not None and input_size[0] != in_chans:
        raise UserError(f'--input-size {" ".join(map(str, input_size))} has {input_size[0]} channels but '
                        f'--in-chans is {in_chans}.')
    channels = in_chans or (input_size[0] if input_size else None)
    for flag in ('mean', 'std'):
        values = getattr(args, flag, None)
        if values is not None and len(values) not in (1, channels or 3):
            raise UserError(f'--{flag} needs one value per input channel ({channels or 3}) or a single value, '
                            f'got {len(values)}: {" ".join(map(str, values))}.')
    if not hasattr(args, 'input_img_mode'):
        return
    if args.input_img_mode is None:
        if channels not in (None, 1, 3):
            raise UserError(f'--in-chans {channels}: pass --input-img-mode with {channels} bands (e.g. RGBA or CMYK).')
        args.input_img_mode = 'L' if channels == 1 else 'RGB'
    try:
        bands = Image.getmodebands(args.input_img_mode)
    except (KeyError, ValueError):
        raise UserError(f"--input-img-mode {args.input_img_mode!r} is not a PIL image mode (e.g. RGB, L, RGBA).") \
            from None
    if bands != (channels or 3):
        raise UserError(f'--input-img-mode {args.input_img_mode} gives {bands} channel(s) but the model takes '
                        f'{channels or 3} (--in-chans).')


def _legacy_validation_multiplier(cfg: Dict[str, Any], value: Any, notes: List[str]) -> None:
    if value not in (None, 1, 1.0) and cfg.get('validation_batch_size') is None and cfg.get('batch_size'):
        cfg['validation_batch_size'] = int(cfg['batch_size'] * value)
        notes.append(f'config key validation_batch_size_multiplier={value} (timm < 0.6) mapped to '
                     f'validation_batch_size={cfg["validation_batch_size"]}.')
    else:
        notes.append('config key validation_batch_size_multiplier (timm < 0.6) ignored: the validation batch '
                     'size defaults to the training batch size.')


def _legacy_native_amp(cfg: Dict[str, Any], value: Any, notes: List[str]) -> None:
    if value:
        cfg['amp'] = True
        notes.append('config key native_amp=true (timm < 0.6) mapped to amp=true.')
    else:
        notes.append('config key native_amp (timm < 0.6) ignored: use amp / amp_dtype.')


def _legacy_jsd(cfg: Dict[str, Any], value: Any, notes: List[str]) -> None:
    cfg.setdefault('jsd_loss', bool(value))
    notes.append(f'config key jsd (timm < 0.6) mapped to jsd_loss={bool(value)}.')


def _legacy_ignored(reason: str):
    def _handle(cfg, value, notes, _key=None):
        notes.append(reason)
    return _handle


# key -> handler(cfg, value, notes)
LEGACY_KEYS = {
    'bn_tf': _legacy_ignored('config key bn_tf (TensorFlow-style BatchNorm, timm < 0.6) ignored: timm 1.x has no such option.'),
    'jsd': _legacy_jsd,
    'local_rank': _legacy_ignored('config key local_rank ignored: the rank comes from torchrun\'s environment (LOCAL_RANK).'),
    'native_amp': _legacy_native_amp,
    'validation_batch_size_multiplier': _legacy_validation_multiplier,
}


def load_config_file(path: str) -> Dict[str, Any]:
    try:
        with open(path, 'r', encoding='utf-8') as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file '{path}' does not exist.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}).") \
            from None
    except OSError as e:
        raise UserError(f"cannot read config file '{path}': {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UserError(f"config file '{path}' must hold a mapping of option names to values, not a {type(cfg).__name__}.")
    return cfg


def _dests(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ('help', argparse.SUPPRESS)}


def _convert_one(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        raise argparse.ArgumentTypeError(f'expected a single value, got {value!r}')
    if action.type is None or action.type is str:
        if isinstance(value, bool):
            raise argparse.ArgumentTypeError(f'expected text, got {value!r}')
        converted = str(value)
    else:
        try:
            converted = action.type(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'invalid value {value!r}') from None
    if action.choices is not None and converted not in action.choices:
        raise argparse.ArgumentTypeError(
            f"invalid choice {value!r} (choose from {', '.join(map(repr, action.choices))})")
    return converted


def _config_value(action: argparse.Action, value: Any) -> Any:
    """A YAML value for `action`, checked and converted as the command line would be."""
    if value is None:
        if action.default is not None:
            raise argparse.ArgumentTypeError('needs a value (null is not one; remove the key to keep the default)')
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f'must be true or false, got {value!r}')
        return value
    if isinstance(action, ParseKwargs):
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            try:
                return parse_key_values(value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        raise argparse.ArgumentTypeError(f'must be a mapping such as {{num_blocks: 2}}, got {value!r}')
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise argparse.ArgumentTypeError(f'needs {action.nargs} values, got {value!r}')
        if action.nargs == '+' and not items:
            raise argparse.ArgumentTypeError('needs at least one value')
        return [_convert_one(action, item) for item in items]
    return _convert_one(action, value)


def parse_args_with_config(
        parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]] = None,
        legacy: Optional[Dict[str, Any]] = None,
) -> Tuple[argparse.Namespace, List[str]]:
    """Parse `argv` with YAML defaults from ``--config``. Returns (args, notes for the log)."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')
    cfg_args, remaining = config_parser.parse_known_args(argv)
    notes: List[str] = []
    legacy = LEGACY_KEYS if legacy is None else legacy
    if cfg_args.config:
        cfg = load_config_file(cfg_args.config)
        dests = _dests(parser)
        mapped: Dict[str, Any] = {}
        for key, value in cfg.items():
            norm = str(key).replace('-', '_')
            if norm in dests and norm not in legacy:
                try:
                    mapped[norm] = _config_value(dests[norm], value)
                except argparse.ArgumentTypeError as e:
                    raise UserError(f"config key '{key}' in '{cfg_args.config}': {e}.") from None
        for key, value in cfg.items():
            norm = str(key).replace('-', '_')
            if norm in legacy:
                legacy[norm](mapped, value, notes)
                continue
            if norm in dests:
                continue
            close = difflib.get_close_matches(norm, list(dests), n=3)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise UserError(f"unknown key '{key}' in config file '{cfg_args.config}'{hint}")
        parser.set_defaults(**mapped)
    args = parser.parse_args(remaining)
    args.config = cfg_args.config
    return args, notes


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def plain_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """A copy holding only YAML/pickle-safe values (what checkpoints and args.yaml store)."""
    return argparse.Namespace(**{k: _plain(v) for k, v in vars(args).items()})


def args_to_yaml(args: argparse.Namespace) -> str:
    return yaml.safe_dump({k: _plain(v) for k, v in sorted(vars(args).items())}, default_flow_style=False)
