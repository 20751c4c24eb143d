"""train.py / validate.py with NOAH on other timm backbones: `--noah-head` and the registered CNN rows."""
import json
import os

import timm
import torch

from noah_mlp import train as train_mod
from noah_mlp import validate as validate_mod
from noah_mlp import visualize as visualize_mod
from noah_mlp.checkpoint import safe_load

from noah_train_helpers import FAST, make_image_folder

# timm's tiny test ResNet (~0.3M parameters) at 32 px: a 1x1 final map would leave NOAH one token
BACKBONE = ['--model', 'test_resnet', '--img-size', '32']


def test_noah_head_flag_trains_saves_and_validates_any_timm_model(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / 'data'), size=32)
    out, hf = str(tmp_path / 'out'), str(tmp_path / 'hf')
    args = [data] + BACKBONE + ['--noah-head', '--head-drop', '0.2', '--model-kwargs', 'key_ratio=0.25'] + FAST
    assert train_mod.main(args + ['--epochs', '1', '--output', out, '--experiment', 'e', '--save-hf', hf]) == 0
    ckpt = safe_load(os.path.join(out, 'e', 'last.pth.tar'))
    assert ckpt['args'].noah_head and ckpt['arch'] == 'test_resnet'
    channels = timm.create_model('test_resnet').num_features
    assert ckpt['state_dict']['fc.query.weight'].shape == (4 * 3, channels // 4 // 4, 1, 1)  # r=1/4, N=4, 3 classes

    # validate.py rebuilds the NOAH model from the checkpoint's own arguments
    results = str(tmp_path / 'r.json')
    assert validate_mod.main([data, '--model', 'test_resnet', '--checkpoint', os.path.join(out, 'e', 'last.pth.tar'),
                              '--workers', '0', '--results-file', results]) == 0
    assert 0 <= json.load(open(results))['top1'] <= 100

    # the --save-hf folder is a timm model of its own
    model = timm.create_model(f'local-dir:{hf}', pretrained=True).eval()
    assert model.noah_head.key_ratio == 0.25 and model.noah_head.num_classes == 3
    sd = ckpt['state_dict']
    best = safe_load(os.path.join(out, 'e', 'model_best.pth.tar'))['state_dict']
    torch.testing.assert_close(model.state_dict()['fc.query.weight'], best['fc.query.weight'])
    assert sd.keys() == model.state_dict().keys()

    # noah-visualize draws the maps over the backbone's final feature map
    figures = str(tmp_path / 'figures')
    image = os.path.join(data, 'val', 'class0', '0.png')
    assert visualize_mod.main(['--model', 'test_resnet', '--checkpoint', os.path.join(out, 'e', 'last.pth.tar'),
                               '--out', figures, '--topk', '2', image]) == 0
    assert os.listdir(figures) == ['0_attention.png']


def test_noah_head_flag_on_a_noah_model_is_an_error(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / 'data'), classes=2, train_per_class=2, val_per_class=1)
    code = train_mod.main([data, '--model', 'noah_resnet18', '--noah-head', '--epochs', '1'] + FAST)
    assert code == 2
    assert 'already has a NOAH head' in capsys.readouterr().err


def test_registered_cnn_row_trains(tmp_path):
    data = make_image_folder(str(tmp_path / 'data'), classes=2, train_per_class=4, val_per_class=2, size=32)
    out = str(tmp_path / 'out')
    args = [data, '--model', 'noah_mobilenetv2_035', '--img-size', '32', '--epochs', '1', '--output', out,
            '--experiment', 'm'] + FAST
    assert train_mod.main(args) == 0
    sd = safe_load(os.path.join(out, 'm', 'last.pth.tar'))['state_dict']
    assert sd['classifier.query.weight'].shape == (8 * 2, 1280 // 4 // 8, 1, 1)
