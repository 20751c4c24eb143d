"""A training run's output folder: start-up checks, one lock per folder, fresh names for new runs.

Rank 0 holds an exclusive ``flock`` on ``.noah-run.lock`` inside the run folder for the run's
whole life; the kernel drops it when the process ends, however it ends (kill -9 included). The
file records who holds it (pid, host, start time), so a second run on the same folder is refused
with one line that names the holder. A new run never writes into a folder that holds another
run's files: like timm's ``get_outdir(..., inc=True)`` it takes the next free ``NAME-1``,
``NAME-2``, ... (``--resume`` continues the resumed run in its own folder).
"""
import errno
import fcntl
import json
import os
import socket
import tempfile
from datetime import datetime
from typing import Optional

from .errors import UserError

__all__ = ['LOCK_NAME', 'RunFolderLock', 'check_writable_folder', 'check_writable_file', 'claim_run_folder']

LOCK_NAME = '.noah-run.lock'


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_writable_folder(path: str, what: str, create: bool = True) -> None:
    """Prove a file can be written in folder `path` (created now if `create`, else its nearest existing
    parent must allow creating it later); UserError naming `what` otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a file, not a folder.")
    target = os.path.abspath(path)
    try:
        if create:
            os.makedirs(target, exist_ok=True)
        else:
            while not os.path.exists(target):
                target = os.path.dirname(target)
            if not os.path.isdir(target):
                raise UserError(f"{what} '{path}' cannot be created: '{target}' is a file.")
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be written ({_reason(e)}).") from None


def check_writable_file(path: str, what: str) -> None:
    """`path` must not be a folder, and its folder must exist or be creatable, and be writable."""
    if os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a folder, not a file.")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), f'the folder of {what}', create=False)


class RunFolderLock:
    """An exclusive, non-blocking flock on the run folder's lock file, held until `release` or exit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def holder(self) -> str:
        try:
            with open(self.path) as f:
                info = json.loads(f.read() or '{}')
            return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
        except (OSError, ValueError):
            return 'a process that has not recorded itself yet'

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        self._fd = fd
        return True

    def record_holder(self) -> None:
        """Write who holds the lock into the lock file (read by a refused second run)."""
        record = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                 started=datetime.now().astimezone().isoformat(timespec='seconds')))
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (record + '\n').encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _holds_run_files(folder: str) -> bool:
    return any(name != LOCK_NAME for name in os.listdir(folder))


def claim_run_folder(folder: str, continuing: bool, named: bool) -> RunFolderLock:
    """Lock the run folder, creating it; returns the held lock (its ``folder`` may carry a suffix).

    `continuing`: a resume into its own folder (the folder's files are this run's). Otherwise the
    folder must be new or empty: an occupied one gives way to ``folder-1``, ``folder-2``, ... A
    folder whose lock another live process holds is refused when `continuing` or `named` (two runs
    of one experiment); unnamed runs started in the same second take the next suffix instead.
    """
    base = folder.rstrip(os.sep)
    for i in range(10000):
        candidate = base if i == 0 else f'{base}-{i}'
        try:
            os.makedirs(candidate, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder '{candidate}' ({_reason(e)}).") from None
        lock = RunFolderLock(candidate)
        if not lock.try_acquire():
            if continuing or (named and i == 0):
                raise UserError(f"the run folder '{candidate}' is in use by another run ({lock.holder()}); "
                                f"wait for it to end, or pass another --experiment.")
            continue
        if continuing or not _holds_run_files(candidate):
            lock.record_holder()
            return lock
        lock.release()  # a finished run's folder: keep it, take the next name
    raise UserError(f"no free run folder name after '{base}-9999'.")
