"""Safe checkpoint reading, architecture checks and atomic checkpoint writing.

Reading never executes pickled code: files are opened with ``torch.load(weights_only=True)``
(``argparse.Namespace`` allow-listed, as timm's training checkpoints hold one), and a file that
needs anything else is refused. Writing goes to a temporary file in the target folder, is flushed
and fsynced, then renamed over the target, so a kill at any moment leaves either the old or the
new file, both complete. Written files get the permissions the umask allows (as ``open`` would).
"""
import argparse
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.utils import CheckpointSaver, get_state_dict

from .errors import UserError

__all__ = [
    'safe_load', 'extract_state_dict', 'load_weights', 'check_compatible', 'atomic_save', 'atomic_write_text',
    'atomic_copy', 'read_checkpoint_header', 'AtomicCheckpointSaver',
]

_logger = logging.getLogger('noah_mlp.checkpoint')


def _is_safetensors(head: bytes, size: int) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header
    return len(head) > 8 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < size


def _not_a_checkpoint(path: str, head: bytes, detail: str) -> UserError:
    """The error for bytes torch.load cannot read, saying what they look like (a saved URL is common)."""
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        text = ''
    if text and all(c.isprintable() or c.isspace() for c in text):
        first = next((line.strip() for line in text.splitlines() if line.strip()), '')
        return UserError(f"checkpoint '{path}' is a text file, not a PyTorch checkpoint (it begins {first[:80]!r}); "
                         f"if that is a link, download the file it names.")
    return UserError(f"checkpoint '{path}' is corrupt or not a PyTorch checkpoint ({detail}).")


def safe_load(path: str) -> Any:
    """Load a checkpoint file without running pickled code; UserError for missing, corrupt or unsafe files.

    torch.save files are read weights-only; .safetensors files (timm's hub format) give their tensors
    (read with the safetensors package: torch.load reads them only in recent PyTorch releases).
    """
    if not os.path.exists(path):
        raise UserError(f"checkpoint '{path}' does not exist.")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' is not a file.")
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            head = f.read(256)
    except OSError as e:
        raise UserError(f"cannot read checkpoint '{path}': {e.strerror or e}.") from None
    if size == 0:
        raise UserError(f"checkpoint '{path}' is empty (0 bytes); it is corrupt or was never written.")
    if _is_safetensors(head, size):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as e:  # the file's bytes decide what fails; every failure means a bad file
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"checkpoint '{path}' is a corrupt safetensors file ({first}).") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # a reference to a Python global (a class or function to call) is what could run code;
        # any other unpickling failure means the bytes are not a checkpoint
        globals_named = [line.strip().rstrip('.') for line in text.splitlines() if 'GLOBAL' in line or 'global' in line]
        if globals_named:
            raise UserError(
                f"refused to load checkpoint '{path}': it holds pickled Python objects that could run code "
                f"when loaded ({globals_named[0]}). Only tensors, plain containers and argparse.Namespace are "
                f"accepted; nothing from the file was executed.") from None
        detail = next((line.strip() for line in text.splitlines() if 'Unsupported' in line), text.splitlines()[0])
        raise _not_a_checkpoint(path, head, detail) from None
    except OSError as e:
        raise UserError(f"cannot read checkpoint '{path}': {e.strerror or e}.") from None
    except Exception as e:  # weights-only loading runs no code: any other failure is in the file's bytes
        raise _not_a_checkpoint(path, head, (str(e).splitlines() or [type(e).__name__])[0]) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(checkpoint: Any, use_ema: bool = False, path: str = '') -> Dict[str, torch.Tensor]:
    """The model weights of a timm training checkpoint (``state_dict`` / ``state_dict_ema`` /
    ``model`` entries) or of a bare state dict, with DDP's ``module.`` prefixes removed."""
    where = f" '{path}'" if path else ''
    if not isinstance(checkpoint, dict):
        raise UserError(f'checkpoint{where} holds a {type(checkpoint).__name__}, not a state dict or a training checkpoint.')
    state_dict = None
    if use_ema:
        for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):  # timm's order
            if key in checkpoint and isinstance(checkpoint[key], dict):
                state_dict = checkpoint[key]
                break
    else:
        for key in ('state_dict', 'model'):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                state_dict = checkpoint[key]
                break
    if state_dict is None:
        state_dict = checkpoint
    if not _is_state_dict(state_dict):
        raise UserError(f'checkpoint{where} has no model weights (keys: {", ".join(map(str, list(checkpoint)[:8]))}).')
    out = OrderedDict()
    for k, v in state_dict.items():
        out[k[7:] if k.startswith('module.') else k] = v
    return out


def _limited(items, n: int = 8) -> str:
    items = list(items)
    text = ', '.join(items[:n])
    return text + (f', ... ({len(items) - n} more)' if len(items) > n else '')


def check_compatible(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: str = '', arch: str = '') -> None:
    """Raise a UserError that names the differing keys and shapes if `state_dict` does not fit `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
        for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if not (missing or unexpected or shapes):
        return
    where = f" '{path}'" if path else ''
    name = f' {arch}' if arch else ''
    lines = [f'checkpoint{where} does not fit the model{name} (another architecture or settings?):']
    if shapes:
        lines.append(f'  {len(shapes)} shape mismatch(es): {_limited(shapes, 6)}')
        if any(('mlp_tokens.' in s or '.gate.proj.' in s) for s in shapes):
            lines.append('  (token-mixing weights depend on the number of patches: use the training --img-size '
                         'and patch size)')
    if missing:
        lines.append(f'  {len(missing)} key(s) missing from the checkpoint: {_limited(missing)}')
    if unexpected:
        lines.append(f'  {len(unexpected)} unexpected key(s) in the checkpoint: {_limited(unexpected)}')
    raise UserError('\n'.join(lines))


def load_weights(model: torch.nn.Module, path: str, use_ema: bool = False) -> Any:
    """Load weights from `path` into `model` (strict, after an explicit compatibility check). Returns the file's content."""
    checkpoint = safe_load(path)
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema, path=path)
    check_compatible(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return checkpoint


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_name_pattern(name_pattern: str) -> str:
    """Regex of the temporary files `_atomic_write` uses for a target whose name matches `name_pattern`."""
    return r'\.(?:' + name_pattern + r')\.[A-Za-z0-9_]+\.tmp'


def _atomic_write(path: str, write_fn) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # named as temp_name_pattern() describes, so that a later run can recognise what a kill left behind
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            os.fchmod(f.fileno(), _umask_file_mode())  # mkstemp creates 0600
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to `path` through a fsynced temporary file and a rename."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def atomic_copy(src: str, dst: str) -> None:
    """Copy `src` over `dst` so that `dst` is at every moment either its old or its new complete content."""
    def _copy(f):
        with open(src, 'rb') as s:
            shutil.copyfileobj(s, f, 1 << 20)
    _atomic_write(dst, _copy)


def read_checkpoint_header(path: str) -> Optional[Dict[str, Any]]:
    """The entries of a training checkpoint other than tensors and state dicts (epoch, metric, ...), read
    through a memory map so that the weights are not read; None if the file is missing or unreadable."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is "no usable checkpoint here"
        return None
    if not isinstance(ckpt, dict):
        return None
    return {k: v for k, v in ckpt.items() if not isinstance(v, (dict, torch.Tensor))}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver with every write atomic and nothing outside its run folder ever touched.

    timm writes ``tmp.pth.tar`` without fsync, unlinks the target before renaming, and hard links
    ``model_best`` / ``checkpoint-N``. Here each checkpoint is written through a fsynced temporary
    file and renamed over its target (never unlinked first), and copies are real files written the
    same way, so ``last``, ``model_best`` and ``checkpoint-N`` are complete at every moment.
    Extra entries (scheduler state, update counter, RNG state) come from `extra_state`, a callable.

    The history read back from a checkpoint on resume only names files; entries that are not this
    run's own ``checkpoint-N.pth.tar`` (absolute paths, ``../``, other names) are dropped with a
    warning, and ``model_best.pth.tar`` is checked against the recorded best epoch (a crash during
    its copy is repaired from ``checkpoint-N``, or the best is taken from the file that is there).
    """

    def __init__(self, *args, extra_state=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_state = extra_state
        self.can_hardlink = False
        self._recovery_meta = None
        self._writing: Optional[Tuple[int, Optional[int]]] = None
        self.newest_complete: Optional[Tuple[str, int, Optional[int]]] = None  # (path, epoch, recovery step)

    # ----------------------------------------------------------------------------------- names
    def _checkpoint_name_re(self) -> str:
        return re.escape(self.save_prefix) + r'-\d+' + re.escape(self.extension)

    def _recovery_name_re(self) -> str:
        return re.escape(self.recovery_prefix) + r'-(\d+)-(\d+)' + re.escape(self.extension)

    def own_file_re(self) -> str:
        """Regex of every file name this saver writes (a run folder's checkpoints and their temporaries)."""
        ext = re.escape(self.extension)
        names = [self._checkpoint_name_re(), self._recovery_name_re().replace('(', '(?:'),
                 r'(?:last|model_best|tmp)' + ext, re.escape(self.recovery_prefix) + '_tmp' + ext]
        return '|'.join(names)

    # ----------------------------------------------------------------------------------- writing
    def _save(self, save_path, epoch, metric=None):
        # timm's training-checkpoint layout (see docs/checkpoints.md), written atomically
        state = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,  # epoch is the finished epoch; a resume starts at epoch + 1
        }
        if self.args is not None:
            state['args'] = self.args
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        if self.extra_state is not None:
            state.update(self.extra_state(recovery=self._recovery_meta is not None))
        if self._recovery_meta is not None:
            state.update(self._recovery_meta)
        self._writing = (epoch, self._recovery_meta['recovery_batch_idx'] if self._recovery_meta else None)
        atomic_save(state, save_path)

    def _replace(self, src, dst):
        os.replace(src, dst)
        _fsync_dir(os.path.dirname(os.path.abspath(dst)))
        if self._writing is not None:
            self.newest_complete = (dst, *self._writing)
            self._writing = None

    def _duplicate(self, src, dst):
        atomic_copy(src, dst)

    def save_checkpoint(self, epoch, metric=None):
        """timm's save_checkpoint; then recovery checkpoints of this epoch and earlier are superseded."""
        result = super().save_checkpoint(epoch, metric)
        self.remove_recoveries(up_to_epoch=epoch)
        return result

    def save_recovery(self, epoch, batch_idx=0):
        """Write ``recovery-{epoch}-{batch}.pth.tar``, marked as written in the middle of `epoch`; returns its path."""
        self._recovery_meta = {'recovery': True, 'recovery_batch_idx': batch_idx}
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self._recovery_meta = None
        return self.curr_recovery_file

    def describe_newest_complete(self) -> str:
        if self.newest_complete is None:
            return 'no checkpoint was written yet'
        path, epoch, step = self.newest_complete
        where = f'epoch {epoch}' + (f', interrupted after step {step + 1}' if step is not None else '')
        return f'the newest complete checkpoint is {path} ({where})'

    # ----------------------------------------------------------------------------------- cleaning
    def _remove(self, name: str) -> None:
        try:
            os.remove(os.path.join(self.checkpoint_dir, name))
        except FileNotFoundError:
            pass

    def remove_stale_files(self) -> List[str]:
        """Remove what kills left in the run folder: this saver's temporaries (``.NAME.XXXX.tmp``) and the
        intermediate ``tmp`` / ``recovery_tmp`` files. Call only while holding the run folder's lock."""
        ext = re.escape(self.extension)
        stale = re.compile(temp_name_pattern(self.own_file_re() + r'|summary\.csv|args\.yaml') + '|' +
                           r'tmp' + ext + '|' + re.escape(self.recovery_prefix) + '_tmp' + ext)
        removed = [n for n in sorted(os.listdir(self.checkpoint_dir)) if stale.fullmatch(n)]
        for name in removed:
            self._remove(name)
        return removed

    def remove_recoveries(self, up_to_epoch: int, keep: str = '') -> List[str]:
        """Remove recovery checkpoints of epochs <= `up_to_epoch` (a finished epoch supersedes them)."""
        pattern = re.compile(self._recovery_name_re())
        keep = os.path.abspath(keep) if keep else ''
        removed = []
        for name in sorted(os.listdir(self.recovery_dir)):
            m = pattern.fullmatch(name)
            path = os.path.abspath(os.path.join(self.recovery_dir, name))
            if m and int(m.group(1)) <= up_to_epoch and path != keep:
                os.remove(path)
                removed.append(name)
        for attr in ('curr_recovery_file', 'prev_recovery_file'):
            if getattr(self, attr) and not os.path.exists(getattr(self, attr)):
                setattr(self, attr, '')
        return removed

    # ----------------------------------------------------------------------------------- resuming
    def load_state_dict(self, state_dict):
        """timm's history restore, keeping only entries that name this run's own checkpoint-N files."""
        state = dict(state_dict) if isinstance(state_dict, dict) else {}
        own = re.compile(self._checkpoint_name_re())
        kept = []
        for entry in state.get('checkpoint_files') or []:
            ok = isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) \
                and own.fullmatch(entry[0]) is not None and (entry[1] is None or _is_number(entry[1]))
            if ok:
                kept.append((entry[0], entry[1]))
            else:
                _logger.warning(f'warning: ignored checkpoint history entry {entry!r} from the resumed checkpoint: '
                                f'not a {self.save_prefix}-N{self.extension} file of this run folder.')
        state['checkpoint_files'] = kept
        pending = state.get('pending')
        if not (isinstance(pending, (tuple, list)) and len(pending) == 2 and isinstance(pending[0], int)
                and (pending[1] is None or _is_number(pending[1]))):
            state['pending'] = (None, None)
        if not (isinstance(state.get('best_epoch'), int) and _is_number(state.get('best_metric'))):
            state['best_epoch'] = state['best_metric'] = None
        super().load_state_dict(state)
        self._reconcile_best_file()

    def _reconcile_best_file(self) -> None:
        """Make the recorded best epoch and ``model_best.pth.tar`` agree (a crash or a full disk during the
        copy leaves the old file): repair it from the best ``checkpoint-N``, else believe the file."""
        best_path = os.path.join(self.checkpoint_dir, 'model_best' + self.extension)
        on_disk = read_checkpoint_header(best_path)
        disk_epoch = on_disk.get('epoch') if on_disk else None
        if self.best_epoch is None or disk_epoch == self.best_epoch:
            return
        source = self._checkpoint_path(self.best_epoch)
        if os.path.isfile(source) and (read_checkpoint_header(source) or {}).get('epoch') == self.best_epoch:
            atomic_copy(source, best_path)
            _logger.warning(f'note: {best_path} held epoch {disk_epoch}, not the best epoch {self.best_epoch}: '
                            f'restored it from {source}.')
        elif on_disk is not None and isinstance(disk_epoch, int) and _is_number(on_disk.get('metric')):
            _logger.warning(f'note: best epoch {self.best_epoch} is not on disk any more; the best is '
                            f'{best_path} (epoch {disk_epoch}).')
            self.best_epoch, self.best_metric = disk_epoch, on_disk['metric']
        else:
            self.best_epoch = self.best_metric = None
