"""Command line + YAML configuration with timm's train.py names.

``--config FILE`` (``-c``) sets defaults from a YAML mapping whose keys are the flags' destination
names (``batch_size`` for ``--batch-size``); flags given on the command line override it. An
unknown key is an error naming it. Keys that timm 1.x dropped and that configs written for timm
0.4/0.5 still carry (the upstream NOAH config does) are mapped or ignored with a note.
"""
import argparse
import difflib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .errors import UserError

__all__ = ['ArgumentParser', 'HelpFormatter', 'parse_args_with_config', 'LEGACY_KEYS', 'args_to_yaml']


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it says something (not None, False, '' or []), 110 columns wide."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=110)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, '', [], {}) or action.default is argparse.SUPPRESS:
            return action.help or ''
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error exits with status 2 and a single 'error:' line (plus usage)."""

    def error(self, message):
        raise UserError(f'{message}  (see --help)')


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
        with open(path, 'r') as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file '{path}' does not exist.") from None
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
                mapped[norm] = value
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
        for key, value in list(mapped.items()):
            action = dests[key]
            if isinstance(action, argparse._StoreTrueAction) or isinstance(action, argparse._StoreFalseAction):
                if not isinstance(value, bool):
                    raise UserError(f"config key '{key}' in '{cfg_args.config}' must be true or false, got {value!r}.")
            elif action.nargs in ('+', '*') and value is not None and not isinstance(value, (list, tuple, dict)):
                mapped[key] = [value]
            if action.type is not None and value is not None and action.nargs is None and not isinstance(value, bool):
                try:
                    mapped[key] = action.type(value)
                except (TypeError, ValueError):
                    raise UserError(f"config key '{key}' in '{cfg_args.config}' has an invalid value {value!r}.") from None
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
