"""train.py's timm flags: W&B logging (offline), --val-interval, --head-init-scale/--head-init-bias,
--model-dtype, --torchcompile-mode, the class-count warning and the EMA label of the best metric."""
import csv
import glob
import json
import os
import struct
import sys

import pytest
import torch

from noah_mlp import train as train_mod
from noah_mlp.checkpoint import safe_load

from noah_train_helpers import FAST, TINY, make_image_folder, run_cli


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('tf_data')), classes=3, train_per_class=8, val_per_class=2)


def _rows(folder):
    with open(os.path.join(folder, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


def test_wandb_offline_val_interval_ema_label_and_class_warning(data, tmp_path):
    pytest.importorskip('wandb')  # the test extra installs it: CI runs this
    out = str(tmp_path / 'out')
    res = run_cli('train.py', [data] + TINY + FAST + [
        '--epochs', '3', '--val-interval', '2', '--model-ema', '--num-classes', '5', '--output', out,
        '--experiment', 'wb', '--log-wandb', '--wandb-project', 'noah-test', '--wandb-tags', 'tiny', 'cpu'],
        env={'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'})
    assert res.returncode == 0, res.stderr[-3000:]
    exp = os.path.join(out, 'wb')
    rows = _rows(exp)
    # epochs 1 and 2 (the last) are evaluated; epoch 0 has its training loss only
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert rows[0]['eval_top1'] == '' and rows[0]['train_loss'] != ''
    assert rows[1]['eval_top1'] != '' and rows[2]['ema_eval_top1'] != ''
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(exp, 'checkpoint-*.pth.tar'))) == [
        'checkpoint-1.pth.tar', 'checkpoint-2.pth.tar']
    assert 'warning: --num-classes 5 but the dataset has 3 classes (num_classes from the command line or --config)' in res.stdout
    assert '*** Best metric (EMA weights): top1 ' in res.stdout
    # the offline W&B run (in the run's folder) holds one history row per epoch, equal to summary.csv's
    files = glob.glob(os.path.join(exp, 'wandb', 'offline-run-*', 'run-*.wandb'))
    assert len(files) == 1, os.listdir(exp)
    records = list(_wandb_records(files[0]))
    history = [{i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof('record_type') == 'history']
    assert [h['_step'] for h in history] == [h['epoch'] for h in history] == [0, 1, 2]
    for h, row in zip(history, rows):
        for key, value in row.items():
            if value != '':
                assert h[key] == pytest.approx(float(value), rel=1e-6), (key, h, row)
    assert 'eval_top1' not in history[0]
    run = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
    assert (run.project, list(run.tags), run.display_name) == ('noah-test', ['tiny', 'cpu'], 'wb')
    config = {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in run.config.update}
    assert config['model'] == 'noah_mixer_s16_224' and config['val_interval'] == 2


def _wandb_records(path):
    """The protobuf records of a W&B run file: a 7-byte header, then LevelDB-style log blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, 'rb').read()
    assert data[:4] == b':W&B'
    pos, buf = 7, b''
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b''
            yield record


def test_wandb_missing_package_and_resume_id_without_resume(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb raises ImportError
    assert train_mod.main([data] + TINY + FAST + ['--log-wandb', '--output', str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'error: --log-wandb needs the wandb package: pip install "noah-mlp[wandb]" (or pip install wandb).']
    monkeypatch.delitem(sys.modules, 'wandb')
    pytest.importorskip('wandb')
    assert train_mod.main([data] + TINY + FAST + ['--log-wandb', '--wandb-resume-id', 'abc123', '--epochs', '1',
                                                  '--output', str(tmp_path)]) == 2
    assert '--wandb-resume-id continues a W&B run' in capsys.readouterr().err


def test_head_init_and_model_dtype_reach_the_trained_model(data, tmp_path):
    # lr 0: the head keeps its initialisation; every logit is the bias, so the loss is log(3)
    out = str(tmp_path)
    assert train_mod.main([data] + TINY + FAST + [
        '--lr', '0', '--weight-decay', '0', '--epochs', '1', '--head-init-scale', '0', '--head-init-bias', '0.5',
        '--model-dtype', 'bfloat16', '--smoothing', '0', '--output', out, '--experiment', 'hi']) == 0
    sd = safe_load(os.path.join(out, 'hi', 'last.pth.tar'))['state_dict']
    assert sd['head.value.weight'].dtype == torch.bfloat16
    assert torch.count_nonzero(sd['head.value.weight']) == 0
    assert torch.equal(sd['head.value.bias'], torch.full_like(sd['head.value.bias'], 0.125))  # 0.5 / N=4
    row = _rows(os.path.join(out, 'hi'))[-1]
    assert float(row['eval_loss']) == pytest.approx(1.0986, abs=1e-2)
    assert float(row['eval_top1']) == pytest.approx(100 / 3, abs=0.01)


def test_head_init_on_a_linear_head_is_timms(tmp_path):
    from timm.models.mlp_mixer import MlpMixer
    model = MlpMixer(num_classes=3, img_size=16, patch_size=4, num_blocks=1, embed_dim=32)
    w = model.head.weight.detach().clone()
    train_mod._init_head(model, 0.5, -1.)
    torch.testing.assert_close(model.head.weight, w * 0.5)
    assert torch.equal(model.head.bias, torch.full((3,), -1.))


def test_torchcompile_mode_is_passed(data, tmp_path, monkeypatch):
    seen = {}

    def fake_compile(model, **kwargs):
        seen.update(kwargs)
        return model
    monkeypatch.setattr(torch, 'compile', fake_compile)
    assert train_mod.main([data] + TINY + FAST + ['--epochs', '1', '--torchcompile', '--torchcompile-mode',
                                                  'reduce-overhead', '--output', str(tmp_path)]) == 0
    assert seen == {'backend': 'inductor', 'mode': 'reduce-overhead'}
