"""validate.py: metrics and results file; our, upstream timm-format and bare checkpoints; bad input."""
import argparse
import csv
import json
import os
import pickle

import pytest
import torch

from noah_mlp import train as train_mod
from noah_mlp import validate as validate_mod
from noah_mlp.checkpoint import safe_load

from noah_train_helpers import FAST, TINY, TINY_MODEL, make_image_folder, run_cli

ARCH = ['--model-kwargs', 'num_blocks=2', 'embed_dim=32', 'patch_size=4', '--img-size', '16']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    data = make_image_folder(str(tmp_path_factory.mktemp('vdata')), val_per_class=4)
    out = str(tmp_path_factory.mktemp('vout'))
    assert train_mod.main([data] + TINY + FAST + ['--epochs', '1', '--output', out, '--experiment', 'v']) == 0
    exp = os.path.join(out, 'v')
    with open(os.path.join(exp, 'summary.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    return data, exp, rows


def test_seed_command_and_results_file(run, tmp_path):
    data, exp, rows = run
    results = tmp_path / 'r.json'
    res = run_cli('validate.py', [data, '--model', TINY_MODEL, '--checkpoint', os.path.join(exp, 'last.pth.tar'),
                                  '--crop-pct', '0.9', '--workers', '0', '--results-file', str(results)])
    assert res.returncode == 0, res.stderr
    assert 'top-1' in res.stdout and 'top-5' in res.stdout
    r = json.loads(results.read_text())
    for key in ('top1', 'top5', 'model', 'checkpoint', 'img_size', 'crop_pct', 'loss'):
        assert key in r, key
    # the training arguments stored in the checkpoint rebuild the tiny model at 16 px
    assert r['img_size'] == 16 and r['crop_pct'] == 0.9 and r['images'] == 12
    # same numbers as the training run's own evaluation of this checkpoint
    assert abs(r['top1'] - float(rows[-1]['eval_top1'])) < 1e-3
    assert abs(r['loss'] - float(rows[-1]['eval_loss'])) < 1e-4


def test_bare_state_dict(run, tmp_path):
    data, exp, rows = run
    sd = safe_load(os.path.join(exp, 'last.pth.tar'))['state_dict']
    bare = tmp_path / 'bare.pth'
    torch.save(sd, str(bare))
    r = validate_mod.validate([data, '--model', TINY_MODEL, '--checkpoint', str(bare), '--num-classes', '3',
                               '--workers', '0', '--crop-pct', '0.9'] + ARCH)
    assert abs(r['top1'] - float(rows[-1]['eval_top1'])) < 1e-3


def test_upstream_timm_format_checkpoint_and_use_ema(run, tmp_path):
    """timm 0.4-style training checkpoint: DDP 'module.' keys, an EMA copy, args of the old script."""
    data, exp, rows = run
    sd = safe_load(os.path.join(exp, 'last.pth.tar'))['state_dict']
    ema = {k: (torch.zeros_like(v) if k.startswith('head.') else v.clone()) for k, v in sd.items()}
    old_args = argparse.Namespace(model=TINY_MODEL, num_classes=3, drop=0.02333, native_amp=False, bn_tf=False)
    ckpt = {'state_dict': {f'module.{k}': v for k, v in sd.items()}, 'state_dict_ema': ema, 'epoch': 299,
            'arch': TINY_MODEL, 'version': 2, 'metric': 75.0, 'args': old_args, 'optimizer': {'state': {}}}
    path = tmp_path / 'upstream.pth.tar'
    torch.save(ckpt, str(path))
    base = [data, '--model', TINY_MODEL, '--checkpoint', str(path), '--workers', '0', '--crop-pct', '0.9'] + ARCH
    r = validate_mod.validate(base)
    assert abs(r['top1'] - float(rows[-1]['eval_top1'])) < 1e-3
    r_ema = validate_mod.validate(base + ['--use-ema'])
    # a zero head gives equal logits: every image is called class 0, one third of the set
    assert abs(r_ema['top1'] - 100. / 3) < 1e-3


def _fails(argv, capsys):
    code = validate_mod.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith('error: ') and 'Traceback' not in err
    return err


def test_checkpoint_of_another_architecture(run, capsys):
    data, exp, _ = run
    err = _fails([data, '--model', TINY_MODEL, '--checkpoint', os.path.join(exp, 'last.pth.tar'), '--workers', '0',
                  '--model-kwargs', 'num_blocks=2', 'embed_dim=64', 'patch_size=4', '--img-size', '16'], capsys)
    assert 'does not fit' in err and 'stem.proj.weight: checkpoint (32, 3, 4, 4) vs model (64, 3, 4, 4)' in err


def test_corrupt_and_unsafe_checkpoints(run, tmp_path, capsys):
    data, exp, _ = run
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(b'PK\x03\x04 not really a zip')
    err = _fails([data, '--model', TINY_MODEL, '--checkpoint', str(corrupt)] + ARCH, capsys)
    assert 'corrupt' in err

    marker = tmp_path / 'ran'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    evil = tmp_path / 'evil.pth'
    evil.write_bytes(pickle.dumps({'state_dict': Evil()}, protocol=2))
    err = _fails([data, '--model', TINY_MODEL, '--checkpoint', str(evil)] + ARCH, capsys)
    assert 'refused to load' in err
    assert not marker.exists()


def test_missing_split_and_unknown_model(run, tmp_path, capsys):
    data, exp, _ = run
    only_train = make_image_folder(str(tmp_path / 'd'), val_name=None, train_per_class=1)
    err = _fails([only_train, '--model', TINY_MODEL] + ARCH, capsys)
    assert "no 'validation' split" in err
    err = _fails([data, '--model', 'noah_gmlp_tiny'], capsys)
    assert 'unknown model' in err and 'noah_gmlp_ti16_224' in err
