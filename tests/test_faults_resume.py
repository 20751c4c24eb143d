"""Fault injection, resume: straight vs resumed runs are equal, recovery checkpoints replay their epoch,
plateau schedules and optimizer mismatches, finished runs."""
import os
import re
import signal

import pytest
import torch

from noah_mlp import train as train_mod
from noah_mlp.checkpoint import safe_load

from noah_train_helpers import TINY, make_image_folder

# every kind of randomness a run draws from: sample order, crops / flips / colour jitter, mixup (numpy),
# head dropout and stochastic depth (torch); EMA and AdamW states to compare
RANDOM = ['--mixup', '0.4', '--head-drop', '0.2', '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9']
BASE = TINY + ['-b', '8', '--workers', '0', '--opt', 'adamw', '--lr', '2e-3', '--warmup-epochs', '1',
               '--log-interval', '1', '--checkpoint-hist', '5']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('data')))


def _train_lines(text, epochs):
    """'Train:' log lines of the given epochs without their timing: step, loss, running mean, lr."""
    lines = []
    for line in text.splitlines():
        m = re.match(r'Train: epoch (\d+) (\[.*?\])\s+loss (\S+) \(avg (\S+)\)\s+lr (\S+)', line)
        if m and int(m.group(1)) in epochs:
            lines.append(m.groups())
    return lines


def _assert_same_state(a, b):
    for key in ('state_dict', 'state_dict_ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k, (a[key][k] - b[key][k]).abs().max())
    oa, ob = a['optimizer']['state'], b['optimizer']['state']
    assert oa.keys() == ob.keys()
    for p in oa:
        for k in oa[p]:
            assert torch.equal(torch.as_tensor(oa[p][k]), torch.as_tensor(ob[p][k])), (p, k)
    assert a['num_updates'] == b['num_updates']


@pytest.mark.parametrize('sched', [
    ['--sched', 'cosine'],
    # plateau: its state (best metric, bad epochs) and the rates it reached must survive the resume
    ['--sched', 'plateau', '--patience-epochs', '0', '--decay-rate', '0.5', '--eval-metric', 'loss'],
])
def test_straight_and_resumed_runs_are_bitwise_equal(data, tmp_path, capsys, sched):
    """CPU, --workers 0: 3 epochs straight == 1 epoch, then resumed for 2 (weights, EMA, AdamW state,
    per-step losses i.e. the data order and augmentations, learning rates)."""
    out = str(tmp_path)
    argv = [data] + BASE + RANDOM + sched + ['--epochs', '3', '--output', out]
    assert train_mod.main(argv + ['--experiment', 'straight']) == 0
    straight_log = capsys.readouterr().out
    resume_from = os.path.join(out, 'straight', 'checkpoint-0.pth.tar')  # the state after epoch 0
    assert train_mod.main(argv + ['--experiment', 'resumed', '--resume', resume_from]) == 0
    resumed_log = capsys.readouterr().out
    assert 'continuing at epoch 1' in resumed_log

    straight_steps, resumed_steps = _train_lines(straight_log, {1, 2}), _train_lines(resumed_log, {1, 2})
    assert len(straight_steps) == 8 and resumed_steps == straight_steps
    _assert_same_state(safe_load(os.path.join(out, 'straight', 'last.pth.tar')),
                       safe_load(os.path.join(out, 'resumed', 'last.pth.tar')))
    lrs = [line.split(',')[-1] for line in open(os.path.join(out, 'straight', 'summary.csv')).read().splitlines()]
    assert lrs[2:] == [line.split(',')[-1] for line in
                       open(os.path.join(out, 'resumed', 'summary.csv')).read().splitlines()][1:]


def _stop_at(monkeypatch, epoch, step):
    """Request a stop (what SIGTERM does) when the log line of `epoch` / `step` (1-based) is written."""
    original = train_mod._log_train_step

    def _log_and_stop(run, meter, e, s, total, *rest):
        original(run, meter, e, s, total, *rest)
        if (e, s + 1) == (epoch, step):
            run.stop.signum = signal.SIGTERM
    monkeypatch.setattr(train_mod, '_log_train_step', _log_and_stop)


def test_recovery_checkpoint_replays_its_epoch_exactly(data, tmp_path, capsys, monkeypatch):
    """A recovery checkpoint restarts its epoch with the same sample order and augmentations: with lr 0
    the weights never change, so the replayed epoch's per-step losses equal the uninterrupted epoch's."""
    out = str(tmp_path)
    argv = [data] + BASE + RANDOM + ['--lr', '0', '--epochs', '2', '--output', out]
    assert train_mod.main(argv + ['--experiment', 'straight']) == 0
    straight = _train_lines(capsys.readouterr().out, {1})

    with monkeypatch.context() as m:
        _stop_at(m, epoch=1, step=2)
        assert train_mod.main(argv + ['--experiment', 'stopped']) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    recovery = re.search(r'--resume (\S+)', err).group(1)
    step = int(re.fullmatch(r'recovery-1-(\d+)\.pth\.tar', os.path.basename(recovery)).group(1))  # 0-based
    ckpt = safe_load(recovery)
    assert ckpt['recovery'] is True and ckpt['epoch'] == 1 and step in (1, 2)
    assert ckpt['num_updates'] == 4 + step + 1  # one epoch of 4 updates, then these (not the epoch start's count)

    assert train_mod.main(argv + ['--resume', recovery]) == 0
    replayed = _train_lines(capsys.readouterr().out, {1})
    assert len(straight) == 4 and replayed == straight
    # the finished epoch supersedes the recovery checkpoint
    assert not [n for n in os.listdir(os.path.join(out, 'stopped')) if n.startswith('recovery-')]


def _fails(argv, capsys):
    code = train_mod.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert 'Traceback' not in err and err.startswith('error: ') and err.count('\n') == 1, err
    return err


def test_resume_with_another_optimizer_is_one_error_line(data, tmp_path, capsys):
    out = str(tmp_path)
    argv = [data] + BASE + ['--epochs', '2', '--output', out]
    assert train_mod.main(argv + ['--epochs', '1', '--experiment', 'adamw']) == 0
    last = os.path.join(out, 'adamw', 'last.pth.tar')
    err = _fails(argv + ['--opt', 'sgd', '--resume', last], capsys)
    assert '--opt adamw' in err and '--no-resume-opt' in err and last in err
    # with --no-resume-opt: the weights resume, a fresh SGD optimizer trains on
    assert train_mod.main(argv + ['--opt', 'sgd', '--no-resume-opt', '--resume', last]) == 0
    ckpt = safe_load(last)
    assert ckpt['epoch'] == 1 and ckpt['args'].opt == 'sgd'
    assert all('momentum_buffer' in s for s in ckpt['optimizer']['state'].values())


def test_resuming_a_finished_run_trains_nothing(data, tmp_path, capsys):
    out = str(tmp_path)
    argv = [data] + BASE + ['--epochs', '1', '--output', out, '--experiment', 'done']
    assert train_mod.main(argv) == 0
    last = os.path.join(out, 'done', 'last.pth.tar')
    before = open(last, 'rb').read()
    capsys.readouterr()
    assert train_mod.main(argv + ['--resume', last]) == 0
    log = capsys.readouterr().out
    assert 'the run is complete, nothing to train' in log and 'Train:' not in log and '-' + '1 epoch' not in log
    assert open(last, 'rb').read() == before


def test_negative_recovery_interval_is_refused(data, tmp_path, capsys):
    err = _fails([data] + BASE + ['--recovery-interval', '-1', '--epochs', '1', '--output', str(tmp_path)], capsys)
    assert '--recovery-interval' in err
