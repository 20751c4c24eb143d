"""validate.py's timm flags beyond the basics: --use-ema honesty, --results-format csv, --valid-labels,
--real-labels, --model-dtype, --seed. The model's logits are made constant per class (value weights 0,
value biases set), so every expected number is known exactly."""
import argparse
import csv
import json
import math
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import noah_mlp  # noqa: F401
from noah_mlp import validate as validate_mod
from noah_mlp.errors import UserError

from noah_train_helpers import TINY_MODEL, make_image_folder

KW = dict(num_blocks=2, embed_dim=32, patch_size=4)
BASE = ['--model', TINY_MODEL, '--workers', '0', '-b', '4']


def _constant_logits_checkpoint(path, logits, ema_logits=None):
    """A training checkpoint whose model outputs `logits` for every image (and `ema_logits` for its EMA)."""
    def weights(values):
        torch.manual_seed(0)
        model = timm.create_model(TINY_MODEL, img_size=16, num_classes=len(values), **KW)
        head = model.get_classifier()
        with torch.no_grad():
            head.value.weight.zero_()
        head.init_scaled(bias=0.)
        with torch.no_grad():
            head.value.bias.copy_(torch.tensor(values, dtype=torch.float32).repeat(head.num_heads) / head.num_heads)
        return model.state_dict()
    ckpt = {'state_dict': weights(logits), 'epoch': 0,
            'args': argparse.Namespace(model=TINY_MODEL, num_classes=len(logits), model_kwargs=KW, img_size=16,
                                       input_size=None)}
    if ema_logits is not None:
        ckpt['state_dict_ema'] = weights(ema_logits)
    torch.save(ckpt, path)
    return str(path)


def _ce(logits, target):
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('vf')), classes=3, train_per_class=1, val_per_class=2)


def test_use_ema_takes_the_ema_weights_and_refuses_a_file_without(data, tmp_path, capsys):
    ckpt = _constant_logits_checkpoint(tmp_path / 'c.pth.tar', [0., 1., 2.], ema_logits=[3., 0., 0.])
    raw = validate_mod.validate([data, '--checkpoint', ckpt] + BASE)
    ema = validate_mod.validate([data, '--checkpoint', ckpt, '--use-ema'] + BASE)
    assert raw['loss'] == pytest.approx(np.mean([_ce([0, 1, 2], t) for t in range(3)]), abs=1e-5)
    assert ema['loss'] == pytest.approx(np.mean([_ce([3, 0, 0], t) for t in range(3)]), abs=1e-5)
    assert 'EMA weights (state_dict_ema)' in capsys.readouterr().out
    no_ema = _constant_logits_checkpoint(tmp_path / 'n.pth.tar', [0., 1., 2.])
    assert validate_mod.main([data, '--checkpoint', no_ema, '--use-ema'] + BASE) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --use-ema: '{no_ema}' holds no EMA weights (no state_dict_ema); "
                   f"leave out --use-ema to evaluate its weights."]


def test_results_format_csv_holds_the_json_numbers(data, tmp_path):
    ckpt = _constant_logits_checkpoint(tmp_path / 'c.pth.tar', [2., 1., 0.])
    validate_mod.validate([data, '--checkpoint', ckpt, '--results-file', str(tmp_path / 'r.json')] + BASE)
    validate_mod.validate([data, '--checkpoint', ckpt, '--results-file', str(tmp_path / 'r.csv'),
                           '--results-format', 'csv'] + BASE)
    as_json = json.loads((tmp_path / 'r.json').read_text())
    with open(tmp_path / 'r.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and list(rows[0]) == list(as_json)
    assert float(rows[0]['top1']) == as_json['top1'] == pytest.approx(100 / 3, abs=1e-3)  # always class 0
    assert float(rows[0]['loss']) == as_json['loss']


def test_valid_labels_score_only_the_listed_classes(data, tmp_path):
    # a 5-class model on a 3-class dataset labelled with classes 4, 0 and 3 of the model
    ckpt = _constant_logits_checkpoint(tmp_path / 'c.pth.tar', [5., 9., 4., 3., 0.])
    (tmp_path / 'valid.txt').write_text('4\n0\n3\n')
    r = validate_mod.validate([data, '--checkpoint', ckpt, '--valid-labels', str(tmp_path / 'valid.txt')] + BASE)
    scored = [0., 5., 3.]  # logits of classes 4, 0, 3: dataset label 1 wins
    assert r['top1'] == pytest.approx(100 / 3, abs=1e-3)
    assert r['loss'] == pytest.approx(np.mean([_ce(scored, t) for t in range(3)]), abs=1e-5)
    (tmp_path / 'bad.txt').write_text('7\n')
    with pytest.raises(UserError, match=r'indices must lie in \[0, 5\)'):
        validate_mod.validate([data, '--checkpoint', ckpt, '--valid-labels', str(tmp_path / 'bad.txt')] + BASE)


def test_real_labels_score_against_the_relabelled_set(tmp_path):
    # ImageNet validation file names, 2 per class; ReaL gives some images other or no labels
    rng = np.random.default_rng(0)
    names = []
    for i in range(6):
        folder = tmp_path / 'data' / 'val' / f'c{i // 2}'
        folder.mkdir(parents=True, exist_ok=True)
        name = f'ILSVRC2012_val_{i + 1:08d}.JPEG'
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name, format='JPEG')
        names.append(name)
    real = [[0], [1], [], [0, 2], [2], [1]]  # model always predicts class 0, then 1, then 2
    (tmp_path / 'real.json').write_text(json.dumps(real))
    ckpt = _constant_logits_checkpoint(tmp_path / 'c.pth.tar', [2., 1., 0.])
    r = validate_mod.validate([str(tmp_path / 'data'), '--checkpoint', ckpt, '--real-labels',
                               str(tmp_path / 'real.json')] + BASE)
    assert r['top1'] == pytest.approx(100 * 2 / 6, abs=1e-3)  # the folder labels: c0 images are right
    assert r['real_top1'] == pytest.approx(100 * 2 / 5, abs=1e-3)  # images 1 and 4 of the 5 with labels
    assert r['real_top5'] == pytest.approx(100., abs=1e-3)
    (tmp_path / 'short.json').write_text(json.dumps(real[:4]))
    with pytest.raises(UserError, match='has 4 entries but the split has 6 images'):
        validate_mod.validate([str(tmp_path / 'data'), '--checkpoint', ckpt, '--real-labels',
                               str(tmp_path / 'short.json')] + BASE)


def test_model_dtype_and_seed(data, tmp_path):
    ckpt = _constant_logits_checkpoint(tmp_path / 'c.pth.tar', [0.5, 0.25, 0.])
    fp32 = validate_mod.validate([data, '--checkpoint', ckpt] + BASE)
    bf16 = validate_mod.validate([data, '--checkpoint', ckpt, '--model-dtype', 'bfloat16'] + BASE)
    assert bf16['loss'] == pytest.approx(fp32['loss'], abs=2e-2) and bf16['top1'] == fp32['top1']
    with pytest.raises(UserError, match='exclude each other'):
        validate_mod.validate([data, '--checkpoint', ckpt, '--model-dtype', 'bfloat16', '--amp'] + BASE)
    # without weights the model starts from the seed: same seed, same numbers
    arch = ['--num-classes', '3', '--img-size', '16', '--model-kwargs'] + [f'{k}={v}' for k, v in KW.items()]
    a = validate_mod.validate([data, '--seed', '1'] + BASE + arch)
    b = validate_mod.validate([data, '--seed', '1'] + BASE + arch)
    c = validate_mod.validate([data, '--seed', '2'] + BASE + arch)
    assert a['loss'] == b['loss'] != c['loss']
