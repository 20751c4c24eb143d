"""Fault injection, the run folder: kills inside writes, two runs on one folder, reused names, crafted
checkpoint histories, the best checkpoint after a crash, full disks, unwritable outputs, file modes."""
import errno
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from noah_mlp import train as train_mod
from noah_mlp import validate as validate_mod
from noah_mlp.checkpoint import safe_load
from noah_mlp.run_folder import LOCK_NAME, claim_run_folder

from noah_fault_helpers import temp_files, train_killed_inside_write
from noah_train_helpers import FAST, REPO, TINY, EvilPickle, make_image_folder


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('data')))


def _fails(argv, capsys, main=train_mod.main):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert 'Traceback' not in captured.err and captured.err.startswith('error: ') and captured.err.count('\n') == 1, \
        captured.err
    return captured


def _checkpoints(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith('.pth.tar') and n not in ('tmp.pth.tar', 'recovery_tmp.pth.tar'))


def _all_load(folder):
    for name in _checkpoints(folder):
        assert 'state_dict' in safe_load(os.path.join(folder, name)), name  # raises on a half-written file


def test_kill_9_at_random_moments_then_resume_cleans_up(data, tmp_path):
    """Kills inside writes (and one at a random moment from outside): every checkpoint left loads, the next
    start removes the temporaries and superseded recovery checkpoints, and the resumed run finishes."""
    rng = random.Random(9)
    out = str(tmp_path / 'out')
    exp = os.path.join(out, 'k9')
    argv = [data] + TINY + FAST + ['--epochs', '3', '--output', out, '--experiment', 'k9', '--recovery-interval', '1']
    last = os.path.join(exp, 'last.pth.tar')

    # writes of the first run: args.yaml, 3 recoveries, summary, last, checkpoint-0, model_best, recoveries...
    first = train_killed_inside_write(argv, '*', rng.randint(9, 13))
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    left = temp_files(exp)
    assert left, os.listdir(exp)  # the kill came inside a write
    _all_load(exp)

    second = train_killed_inside_write(argv + ['--resume', last], '*', rng.randint(2, 6))
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert not set(left) & set(temp_files(exp))  # the first kill's leftovers went at the second start
    _all_load(exp)

    # a kill -9 from outside at a random moment of training
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py')] + argv + ['--resume', last],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        while not proc.stdout.readline().startswith('Train:'):
            pass
        time.sleep(rng.uniform(0., 1.))
        proc.kill()
    finally:
        proc.wait(timeout=60)
    _all_load(exp)

    assert train_mod.main(argv + ['--resume', last]) == 0
    assert temp_files(exp) == []
    assert not [n for n in os.listdir(exp) if n.startswith('recovery-')]  # all superseded by finished epochs
    _all_load(exp)
    assert safe_load(last)['epoch'] == 2


def test_two_runs_on_one_folder(data, tmp_path, capsys):
    """While a run holds its folder, a second run with the same --experiment (or resuming into it) is
    refused with one line naming the holder; after the holder is killed the folder is free again."""
    out = str(tmp_path / 'out')
    argv = [data] + TINY + FAST + ['--output', out, '--experiment', 'shared']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    holder = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py')] + argv + ['--epochs', '200'],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        while True:
            line = holder.stdout.readline()
            assert line, 'the holder ended early'
            if line.startswith('Eval:'):
                break
        err = _fails(argv + ['--epochs', '2'], capsys).err
        assert 'is in use by another run' in err and f'pid {holder.pid} on ' in err and 'started 20' in err
        last = os.path.join(out, 'shared', 'last.pth.tar')
        while not os.path.isfile(last):
            time.sleep(0.1)
        err = _fails([data] + TINY + FAST + ['--epochs', '200', '--resume', last], capsys).err
        assert f'pid {holder.pid}' in err
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert train_mod.main([data] + TINY + FAST + ['--epochs', '200', '--resume', last, '--start-epoch', '199']) == 0


def test_reusing_a_finished_runs_name_takes_a_new_folder(data, tmp_path, capsys):
    out = str(tmp_path / 'out')
    argv = [data] + TINY + FAST + ['--epochs', '1', '--output', out, '--experiment', 'name']
    assert train_mod.main(argv) == 0
    first = {n: os.path.getmtime(os.path.join(out, 'name', n)) for n in os.listdir(os.path.join(out, 'name'))}
    capsys.readouterr()
    assert train_mod.main(argv) == 0
    log = capsys.readouterr().out
    assert f"holds another run's files: this run writes to '{os.path.join(out, 'name-1')}'" in log
    assert {n: os.path.getmtime(os.path.join(out, 'name', n)) for n in os.listdir(os.path.join(out, 'name'))} == first
    assert 'last.pth.tar' in os.listdir(os.path.join(out, 'name-1'))


def test_unnamed_runs_started_in_the_same_second_do_not_collide(tmp_path):
    name = str(tmp_path / '20260101-120000-noah_mixer_s16_224-16')
    first = claim_run_folder(name, continuing=False, named=False)
    second = claim_run_folder(name, continuing=False, named=False)  # the first still holds its folder
    try:
        assert (first.folder, second.folder) == (name, name + '-1')
        with pytest.raises(Exception, match='in use by another run'):
            claim_run_folder(name, continuing=False, named=True)  # a named second run is refused instead
    finally:
        first.release()
        second.release()


def test_crafted_checkpoint_history_deletes_nothing_outside_the_run(data, tmp_path, capsys):
    """A weights-only-loadable checkpoint whose saver history names '/abs/path' or '../x' files: resuming
    with --checkpoint-hist 1 deletes none of them; a pickle planted as model_best never runs."""
    out = str(tmp_path / 'out')
    exp = os.path.join(out, 'run')
    argv = [data] + TINY + FAST + ['--output', out, '--experiment', 'run', '--checkpoint-hist', '1']
    assert train_mod.main(argv + ['--epochs', '1']) == 0
    victim_abs, victim_up = tmp_path / 'precious.txt', tmp_path / 'out' / 'precious2.txt'
    victim_abs.write_text('keep me')
    victim_up.write_text('keep me too')
    last = os.path.join(exp, 'last.pth.tar')
    ckpt = safe_load(last)
    ckpt['saver']['checkpoint_files'] = [(str(victim_abs), 1e9), ('../precious2.txt', 1e8),
                                         ('checkpoint-0.pth.tar', -1.0)]
    torch.save(ckpt, last)
    marker = tmp_path / 'pwned'
    torch.save({'epoch': 0, 'metric': 100.0, 'state_dict': {}, 'x': EvilPickle(str(marker))},
               os.path.join(exp, 'model_best.pth.tar'))
    capsys.readouterr()
    assert train_mod.main(argv + ['--epochs', '3', '--resume', last]) == 0
    log = capsys.readouterr().out
    assert victim_abs.read_text() == 'keep me' and victim_up.read_text() == 'keep me too'
    assert f'ignored checkpoint history entry ({str(victim_abs)!r}' in log and "('../precious2.txt'" in log
    assert not marker.exists()
    assert [n for n in os.listdir(exp) if n.startswith('checkpoint-')] != []


def test_best_epoch_matches_model_best_after_a_crash_during_its_copy(data, tmp_path, capsys):
    out = str(tmp_path / 'out')
    exp = os.path.join(out, 'best')
    argv = [data] + TINY + FAST + ['--epochs', '3', '--output', out, '--experiment', 'best', '--eval-metric', 'loss']
    crashed = train_killed_inside_write(argv, 'model_best.pth.tar', 2)  # the copy of the second best epoch
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    last = safe_load(os.path.join(exp, 'last.pth.tar'))
    assert safe_load(os.path.join(exp, 'model_best.pth.tar'))['epoch'] < last['epoch']  # the crash's state
    assert train_mod.main(argv + ['--resume', os.path.join(exp, 'last.pth.tar')]) == 0
    logged = re.search(r'\*\*\* Best metric \(model weights\): loss (\S+) \(epoch (\d+)\)', capsys.readouterr().out)
    best = safe_load(os.path.join(exp, 'model_best.pth.tar'))
    assert int(logged.group(2)) == best['epoch'] and float(logged.group(1)) == best['metric']
    assert best['epoch'] >= last['epoch']


def test_non_finite_eval_loss_is_never_saved(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / 'out')
    exp = os.path.join(out, 'nan')
    real_evaluate = train_mod.evaluate
    calls = []

    def evaluate_nan_at_epoch_1(*args, **kwargs):
        metrics = real_evaluate(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            metrics['loss'] = float('nan')
        return metrics
    monkeypatch.setattr(train_mod, 'evaluate', evaluate_nan_at_epoch_1)
    err = _fails([data] + TINY + FAST + ['--epochs', '3', '--output', out, '--experiment', 'nan'], capsys).err
    last = os.path.join(exp, 'last.pth.tar')
    assert 'non-finite evaluation loss at epoch 1' in err and f'{last} (epoch 0)' in err
    assert safe_load(last)['epoch'] == 0 and safe_load(os.path.join(exp, 'model_best.pth.tar'))['epoch'] == 0


def test_full_disk_while_saving_is_one_line_naming_what_remains(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / 'out')
    exp = os.path.join(out, 'full')
    real_save = torch.save
    saves = []

    def save_until_disk_full(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # epoch 1's checkpoint: half written, then the disk is full
            f.write(b'\0' * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', save_until_disk_full)
    err = _fails([data] + TINY + FAST + ['--epochs', '3', '--output', out, '--experiment', 'full'], capsys).err
    last = os.path.join(exp, 'last.pth.tar')
    assert 'No space left on device' in err and f'the newest complete checkpoint is {last} (epoch 0)' in err
    monkeypatch.undo()
    assert temp_files(exp) == [] and safe_load(last)['epoch'] == 0


@pytest.mark.parametrize('flag', ['--output', '--save-hf', '--results-file'])
def test_unwritable_outputs_fail_at_start(data, tmp_path, capsys, flag):
    a_file = tmp_path / 'a_file'
    a_file.write_text('not a folder')
    for target in (str(a_file), str(a_file / 'below')):
        if flag == '--results-file':
            argv = [data, '--model', 'noah_mixer_s16_224', '--results-file', os.path.join(target, 'r.json')]
            captured = _fails(argv, capsys, main=validate_mod.main)
        else:
            extra = [flag, target] + ([] if flag == '--output' else ['--output', str(tmp_path / 'out')])
            captured = _fails([data] + TINY + FAST + ['--epochs', '1'] + extra, capsys)
        assert target in captured.err or str(a_file) in captured.err
        assert 'Train:' not in captured.out and '* noah' not in captured.out  # refused before any work


def test_output_files_respect_the_umask(data, tmp_path):
    old = os.umask(0o027)
    try:
        assert train_mod.main([data] + TINY + FAST + ['--epochs', '1', '--output', str(tmp_path), '--experiment',
                                                      'mode']) == 0
    finally:
        os.umask(old)
    exp = tmp_path / 'mode'
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar', 'summary.csv', 'args.yaml', LOCK_NAME):
        assert (exp / name).stat().st_mode & 0o777 == 0o640, name
