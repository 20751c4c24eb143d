"""Training script: outputs, learning, resume, signals, distributed CPU runs, configs and bad input."""
import argparse
import csv
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from noah_mlp import train as train_mod
from noah_mlp.checkpoint import safe_load

from noah_train_helpers import FAST, REPO, TINY, EvilPickle, make_image_folder, run_cli

UPSTREAM_YAML = os.path.join(REPO, 'tests', 'data', 'upstream_default_noah.yaml')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('data')))


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """One 2-epoch run with EMA and float16 AMP (a loss scaler), shared by the tests that read its outputs."""
    out = str(tmp_path_factory.mktemp('out'))
    code = train_mod.main([data] + TINY + FAST + [
        '--epochs', '2', '--output', out, '--experiment', 'run', '--model-ema', '--model-ema-decay', '0.5',
        '--amp', '--amp-dtype', 'float16', '--checkpoint-hist', '1'])
    assert code == 0
    return os.path.join(out, 'run')


def _summary(exp_dir):
    with open(os.path.join(exp_dir, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


def _adam_steps(ckpt):
    return max(int(s['step']) for s in ckpt['optimizer']['state'].values())


def test_run_writes_timm_layout_and_learns(trained):
    names = set(os.listdir(trained))
    assert {'last.pth.tar', 'model_best.pth.tar', 'summary.csv', 'args.yaml'} <= names
    # --checkpoint-hist 1 keeps a single numbered checkpoint
    assert len([n for n in names if n.startswith('checkpoint-')]) == 1
    assert not [n for n in names if n.endswith('.tmp')], names  # no temporary files left behind
    rows = _summary(trained)
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert {'epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'} <= set(rows[0])
    # colour-coded classes: the model must learn them
    assert float(rows[-1]['eval_top1']) >= 90.0 or float(rows[-1]['ema_eval_top1']) >= 90.0
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    ckpt = safe_load(os.path.join(trained, 'last.pth.tar'))
    for key in ('state_dict', 'state_dict_ema', 'optimizer', 'epoch', 'arch', 'version', 'args', 'amp_scaler'):
        assert key in ckpt, key
    assert ckpt['epoch'] == 1 and ckpt['version'] == 2 and ckpt['arch'] == 'noah_mixer_s16_224'
    assert isinstance(ckpt['args'], argparse.Namespace) and ckpt['args'].model_kwargs['embed_dim'] == 32
    with open(os.path.join(trained, 'args.yaml')) as f:
        saved = yaml.safe_load(f)
    assert saved['img_size'] == 16 and saved['amp_dtype'] == 'float16'


def test_resume_restores_state_and_continues_at_next_epoch(trained, data, capsys):
    last = os.path.join(trained, 'last.pth.tar')
    before = safe_load(last)
    rows_before = _summary(trained)
    code = train_mod.main([data] + TINY + FAST + [
        '--epochs', '3', '--resume', last, '--model-ema', '--model-ema-decay', '0.5', '--amp', '--amp-dtype',
        'float16', '--checkpoint-hist', '1'])
    out = capsys.readouterr().out
    assert code == 0
    assert 'continuing at epoch 2' in out and 'Restored the EMA weights' in out
    assert 'Train: epoch 1 ' not in out and 'Train: epoch 2 ' in out
    after = safe_load(last)  # resumed into the same folder
    assert after['epoch'] == 2
    # optimizer restored: AdamW's step count keeps counting from the checkpoint
    # (the float16 loss scaler may skip a few steps, so compare with one epoch's updates)
    steps_per_epoch = before['num_updates'] // 2
    assert after['num_updates'] == 3 * steps_per_epoch
    assert _adam_steps(after) > steps_per_epoch and _adam_steps(after) > _adam_steps(before)
    assert after['amp_scaler']['scale'] > 0
    rows = _summary(trained)
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert rows[:2] == rows_before  # earlier history kept


def _wait_for(proc, prefix, timeout=180):
    deadline, lines = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f'no line starting with {prefix!r}:\n' + ''.join(lines))


def test_sigterm_writes_recovery_checkpoint_and_resume_hint(data, tmp_path):
    out = str(tmp_path / 'out')
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), data] + TINY + FAST + [
        '--epochs', '50', '--output', out, '--experiment', 'sig', '--log-interval', '1']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        _wait_for(proc, 'Train: epoch 0 [2/')
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert 'Traceback' not in stderr
    hint = [line for line in stderr.splitlines() if line.startswith('To resume:')]
    assert hint, stderr
    recovery = re.search(r'--resume (\S+)', hint[0]).group(1)
    assert os.path.basename(recovery).startswith('recovery-0-') and os.path.isfile(recovery)
    ckpt = safe_load(recovery)
    assert ckpt['recovery'] is True and ckpt['epoch'] == 0 and 'optimizer' in ckpt
    # resume it (finishing after the interrupted epoch)
    code = train_mod.main([data] + TINY + FAST + ['--epochs', '1', '--resume', recovery])
    assert code == 0
    assert safe_load(os.path.join(out, 'sig', 'last.pth.tar'))['epoch'] == 0


def test_non_finite_loss_stops_naming_epoch_and_step(data, tmp_path, capsys):
    out = str(tmp_path)
    base = [data] + TINY + ['-b', '8', '--workers', '0', '--opt', 'sgd', '--warmup-epochs', '0', '--output', out,
                            '--experiment', 'nan']
    assert train_mod.main(base + ['--epochs', '1', '--lr', '0.01']) == 0
    last = os.path.join(out, 'nan', 'last.pth.tar')
    good = safe_load(last)
    capsys.readouterr()
    # a tiny normalisation std (a zero one is refused) turns the inputs (and so the loss) into inf / nan at once
    code = train_mod.main(base + ['--epochs', '3', '--lr', '0.01', '--resume', last, '--mean', '1e30', '--std', '1e-30'])
    err = capsys.readouterr().err
    assert code != 0
    assert re.search(r'non-finite loss \(\w+\) at epoch 1 step 1/\d+', err), err
    assert last in err
    kept = safe_load(last)
    assert kept['epoch'] == 0
    assert all(torch.equal(kept['state_dict'][k], good['state_dict'][k]) for k in good['state_dict'])


def test_two_process_cpu_run_through_distributed_train_sh(tmp_path):
    # 3 x 3 = 9 val images: uneven over 2 processes, the sampler pads; metrics must still count 9
    data = make_image_folder(str(tmp_path / 'data'), val_per_class=3)
    out = str(tmp_path / 'out')
    res = run_cli('distributed_train.sh', ['2', data] + TINY + FAST + [
        '--epochs', '2', '--output', out, '--experiment', 'ddp', '--workers', '1'], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert '2 processes, backend gloo' in res.stdout
    assert '(9 images)' in res.stdout
    rows = _summary(os.path.join(out, 'ddp'))
    assert [r['epoch'] for r in rows] == ['0', '1']
    # validate.py on the same checkpoint agrees with the distributed evaluation
    from noah_mlp.validate import validate
    best = os.path.join(out, 'ddp', 'last.pth.tar')
    r = validate([data, '--model', 'noah_mixer_s16_224', '--checkpoint', best, '--workers', '0'])
    assert r['images'] == 9
    assert abs(r['top1'] - float(rows[-1]['eval_top1'])) < 1e-3


def test_upstream_yaml_accepted_unchanged(data, tmp_path, capsys):
    out = str(tmp_path)
    code = train_mod.main([data, '--config', UPSTREAM_YAML] + TINY + [
        '-b', '8', '--workers', '0', '--epochs', '1', '--warmup-epochs', '0', '--output', out, '--experiment', 'up',
        '--val-split', 'val'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for key in ('bn_tf', 'jsd', 'local_rank', 'native_amp', 'validation_batch_size_multiplier'):
        assert f'config key {key}' in captured.out
    assert 'block dropout (proj_drop_rate)' in captured.out
    # upstream's num_classes: 1000 on a 3-class dataset trains, but not silently
    assert 'warning: --num-classes 1000 but the dataset has 3 classes (num_classes from the command line or --config)' in captured.out
    ckpt = safe_load(os.path.join(out, 'up', 'last.pth.tar'))
    args = ckpt['args']
    assert args.opt == 'adamw' and args.lr == 0.0007 and args.mixup == 0.5 and args.model_ema
    assert args.num_classes == 1000 and 'state_dict_ema' in ckpt


def test_default_noah_yaml_has_upstream_recipe():
    parser = train_mod.build_parser()
    from noah_mlp.config import parse_args_with_config
    args, notes = parse_args_with_config(parser, ['--config', os.path.join(REPO, 'configs', 'default_noah.yaml'),
                                                  'DATA', '--model', 'noah_gmlp_ti16_224', '--lr', '1e-3'])
    assert notes == []
    assert (args.drop, args.proj_drop, args.drop_path, args.head_drop) == (0.0, 0.02333, 0.1, 0.1)
    assert args.lr == 1e-3  # command line overrides the file
    assert (args.opt, args.opt_eps, args.weight_decay, args.epochs, args.warmup_epochs) == ('adamw', 1e-6, 0.067, 300, 20)
    assert (args.aa, args.mixup, args.cutmix, args.smoothing, args.clip_grad) == ('rand-m6-n3-mstd1.0-inc1', 0.5, 1.0, 0.1, 1.0)
    assert (args.model_ema_decay, args.crop_pct, args.batch_size) == (0.99992, 0.9, 192)
    kwargs = train_mod._model_args(args, [])
    assert kwargs['proj_drop_rate'] == 0.02333 and kwargs['drop_rate'] == 0.0 and kwargs['head_drop_rate'] == 0.1


# ------------------------------------------------------------------------------------------------ bad input
def _fails(argv, capsys):
    code = train_mod.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert 'Traceback' not in err
    assert err.startswith('error: '), err
    return err


def test_missing_dataset_dir(tmp_path, capsys):
    err = _fails([str(tmp_path / 'nope')] + TINY + FAST, capsys)
    assert 'does not exist' in err and 'nope' in err


def test_missing_val_split(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / 'd'), val_name=None, train_per_class=2)
    err = _fails([data] + TINY + FAST, capsys)
    assert "no 'validation' split" in err and "'train'" in err


def test_unknown_model_suggests_names(data, capsys):
    err = _fails([data, '--model', 'noah_gmlp_ti16_22'] + FAST, capsys)
    assert "unknown model 'noah_gmlp_ti16_22'" in err and 'noah_gmlp_ti16_224' in err


def test_unknown_config_key_is_named(data, tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('lr: 0.1\nwarmup_epoch: 3\n')
    err = _fails([data, '--config', str(cfg)] + TINY + FAST, capsys)
    assert "unknown key 'warmup_epoch'" in err and 'warmup_epochs' in err


def test_corrupt_checkpoint(data, trained, tmp_path, capsys):
    bad = tmp_path / 'bad.pth.tar'
    blob = open(os.path.join(trained, 'last.pth.tar'), 'rb').read()
    bad.write_bytes(blob[:len(blob) // 2])
    err = _fails([data] + TINY + FAST + ['--resume', str(bad)], capsys)
    assert 'corrupt' in err and 'bad.pth.tar' in err


def test_checkpoint_of_another_architecture(data, trained, capsys):
    argv = [data, '--model', 'noah_mixer_s16_224', '--model-kwargs', 'num_blocks=3', 'embed_dim=48', 'patch_size=4',
            '--img-size', '16'] + FAST + ['--initial-checkpoint', os.path.join(trained, 'last.pth.tar')]
    err = _fails(argv, capsys)
    assert 'does not fit the model' in err
    assert 'stem.proj.weight: checkpoint (32, 3, 4, 4) vs model (48, 3, 4, 4)' in err
    assert 'blocks.2.' in err  # keys missing from the checkpoint are named


def test_pickle_that_would_run_code_is_refused(data, tmp_path, capsys):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'epoch': 0, 'payload': EvilPickle(str(marker))}, str(evil))
    err = _fails([data] + TINY + FAST + ['--resume', str(evil)], capsys)
    assert 'refused to load checkpoint' in err and 'evil.pth.tar' in err
    # a plain (non-zip) pickle too
    evil2 = tmp_path / 'evil2.pkl'
    evil2.write_bytes(pickle.dumps(EvilPickle(str(marker)), protocol=2))
    err = _fails([data] + TINY + FAST + ['--initial-checkpoint', str(evil2)], capsys)
    assert 'refused' in err
    assert not marker.exists()


@pytest.mark.parametrize('workers', [0, 1])
def test_unreadable_image_is_named(tmp_path, capsys, workers):
    data = make_image_folder(str(tmp_path / 'd'), train_per_class=4, val_per_class=1)
    broken = os.path.join(data, 'train', 'class1', 'broken.png')
    with open(broken, 'wb') as f:
        f.write(b'this is not a png')
    err = _fails([data] + TINY + ['-b', '4', '--workers', str(workers), '--epochs', '1', '--output',
                                  str(tmp_path / 'o')], capsys)
    assert 'cannot read image' in err and broken in err
    assert err.count('\n') == 1  # one line


def test_cli_error_has_no_traceback(data):
    res = run_cli('train.py', [data, '--model', 'not_a_model_at_all', '--workers', '0'])
    assert res.returncode == 2
    assert 'Traceback' not in res.stderr
    assert res.stderr.strip().startswith("error: unknown model 'not_a_model_at_all'")


def test_kill_9_leaves_loadable_checkpoints(data, tmp_path):
    """SIGKILL right after an evaluation, when the checkpoints are being written: every checkpoint file
    that exists afterwards loads, and last.pth.tar holds a finished epoch."""
    out = str(tmp_path / 'out')
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), data] + TINY + FAST + [
        '--epochs', '50', '--output', out, '--experiment', 'k9', '--checkpoint-hist', '2']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    evals = 0
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith('Eval:'):
                evals += 1
                if evals == 3:
                    proc.kill()  # checkpoint writing of epoch 2 is under way now
                    break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert evals == 3
    exp = os.path.join(out, 'k9')
    files = [f for f in os.listdir(exp) if f.endswith('.pth.tar')]
    assert 'last.pth.tar' in files
    for f in files:
        ckpt = safe_load(os.path.join(exp, f))  # raises (fails the test) on a half-written file
        assert 'state_dict' in ckpt
    assert safe_load(os.path.join(exp, 'last.pth.tar'))['epoch'] in (1, 2)


def test_grad_accum_and_grad_checkpointing(data, tmp_path, capsys):
    code = train_mod.main([data] + TINY + FAST + [
        '--epochs', '1', '--output', str(tmp_path), '--experiment', 'acc', '--grad-accum-steps', '2',
        '--grad-checkpointing', '--log-interval', '1'])
    out = capsys.readouterr().out
    assert code == 0
    assert 'global batch 16' in out  # 8 per step x 2 accumulated steps
    ckpt = safe_load(os.path.join(str(tmp_path), 'acc', 'last.pth.tar'))
    assert ckpt['num_updates'] == 2  # 36 images / batch 8 = 4 steps -> 2 optimizer updates
    assert _adam_steps(ckpt) == 2


def test_sync_bn_refused_with_reason(data, capsys):
    err = _fails([data] + TINY + FAST + ['--sync-bn'], capsys)
    assert '--sync-bn' in err and ('distributed' in err or 'CUDA' in err)


def test_two_process_sigterm_to_launcher_writes_recovery(data, tmp_path):
    out = str(tmp_path / 'out')
    cmd = ['bash', os.path.join(REPO, 'distributed_train.sh'), '2', data] + TINY + FAST + [
        '--epochs', '100', '--output', out, '--experiment', 'dsig', '--log-interval', '1']
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        _wait_for(proc, 'Train: epoch 0 [1/')
        proc.send_signal(signal.SIGTERM)  # bash exec'd the launcher: it forwards SIGTERM to both workers
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert 'Traceback' not in stderr
    assert stderr.count('SIGTERM received') == 1  # rank 0 speaks for the run
    launcher = os.path.join(REPO, 'distributed_train.sh')  # the resume command repeats the launcher as typed
    hint = [line for line in stderr.splitlines() if line.startswith(f'To resume: bash {launcher} 2 ')]
    assert len(hint) == 1, stderr
    recovery = re.search(r'--resume (\S+)', hint[0]).group(1)
    ckpt = safe_load(recovery)
    assert ckpt['recovery'] is True and ckpt['epoch'] == 0


def test_two_process_unreadable_image_one_clean_line(tmp_path):
    data = make_image_folder(str(tmp_path / 'd'), train_per_class=3, val_per_class=1)
    broken = os.path.join(data, 'train', 'class2', 'zzz.png')
    with open(broken, 'w') as f:
        f.write('garbage')
    # batch 1: every one of the 10 images is read in the first epoch, on one of the two processes
    res = run_cli('distributed_train.sh', ['2', data] + TINY + FAST + [
        '-b', '1', '--epochs', '1', '--output', str(tmp_path / 'o'), '--workers', '1'], timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith('error')]
    assert len(errors) == 1 and broken in errors[0], res.stderr
