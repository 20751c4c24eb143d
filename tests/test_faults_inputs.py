"""Bad input, answered up front by one `error:` line and exit status 2; evaluation in the training classes.

`BAD_INPUTS` is the table: each row names the tool, how it is run (in-process `main(argv)`, the
script in a subprocess, or two processes through distributed_train.sh), the damage done first
(a YAML file, a text "checkpoint", a broken image, a class folder) and a fragment of the message.
"""
import csv
import os
import re
import shutil
import struct
import sys
import zlib
from types import SimpleNamespace

import pytest
import yaml

from noah_mlp import train as train_mod
from noah_mlp import validate as validate_mod
from noah_mlp import visualize as visualize_mod
from noah_mlp.checkpoint import safe_load
from noah_mlp.train_args import build_parser
from noah_mlp.config import parse_args_with_config

from noah_train_helpers import FAST, TINY, TINY_MODEL, make_image_folder, run_cli

ARCH = ['--model-kwargs', 'num_blocks=2', 'embed_dim=32', 'patch_size=4', '--img-size', '16']
TOOLS = {'train': train_mod.main, 'validate': validate_mod.main, 'visualize': visualize_mod.main}
SCRIPTS = {'train': 'train.py', 'validate': 'validate.py'}


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('data')), train_per_class=4, val_per_class=2)


@pytest.fixture(scope='module')
def checkpoint(pristine, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('out'))
    assert train_mod.main([pristine] + TINY + FAST + ['--epochs', '1', '--output', out, '--experiment', 'e']) == 0
    return os.path.join(out, 'e', 'last.pth.tar')


@pytest.fixture
def ctx(pristine, checkpoint, tmp_path):
    data = str(tmp_path / 'data')
    shutil.copytree(pristine, data)
    return SimpleNamespace(data=data, ckpt=checkpoint, tmp=tmp_path, out=str(tmp_path / 'out'))


# ------------------------------------------------------------------------------------ damage done first
def _write(path, content) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _yaml(text):
    return lambda c: _write(c.tmp / 'cfg.yaml', text)


def _text_file(c):
    return _write(c.tmp / 'model.pth.tar', 'https://example.com/noah_gmlp_ti16.pth.tar\n')


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing width x height pixels, no pixel data: PIL refuses it when opening."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IEND', b''))


def _dangling_link(split):
    def setup(c):
        link = os.path.join(c.data, split, 'class1', 'gone.png')
        os.symlink(os.path.join(c.data, 'deleted.png'), link)
    return setup


def _truncated_png(c):
    with open(os.path.join(c.data, 'train', 'class0', '0.png'), 'rb') as f:
        good = f.read()
    _write(os.path.join(c.data, 'train', 'class2', 'cut.png'), good[:len(good) // 2])


def _bomb_png(c):
    _write(os.path.join(c.data, 'train', 'class0', 'bomb.png'), _png_claiming(20000, 10000))


def _no_permission(c):
    path = os.path.join(c.data, 'train', 'class1', '0.png')
    os.chmod(path, 0)


def _val_only_class(c):
    shutil.copytree(os.path.join(c.data, 'val', 'class0'), os.path.join(c.data, 'val', 'dog'))


def _empty_train_class(c):
    os.makedirs(os.path.join(c.data, 'train', 'zebra'))


def _loose_train_images(c):
    shutil.copy(os.path.join(c.data, 'train', 'class0', '0.png'), os.path.join(c.data, 'train', 'stray.png'))


def _image(c):
    return shutil.copy(os.path.join(c.data, 'val', 'class0', '0.png'), str(c.tmp / 'cat.png'))


# ------------------------------------------------------------------------------------ the table
def _train(*extra, arch=None):
    return lambda c: [c.data] + (TINY if arch is None else arch) + FAST + ['--epochs', '1', '--output', c.out] + list(extra)


def _kwargs(img: int = 16, **kw):
    """TINY with some model arguments replaced."""
    merged = {**dict(num_blocks=2, embed_dim=32, patch_size=4), **kw}
    return ['--model', TINY_MODEL, '--img-size', str(img), '--model-kwargs'] + [f'{k}={v}' for k, v in merged.items()]


def _validate(*extra):
    return lambda c: [c.data, '--model', TINY_MODEL, '--checkpoint', c.ckpt, '--workers', '0'] + list(extra)


# (name, tool, how it runs, setup, argv, fragment of the one error line)
BAD_INPUTS = [
    # values, refused by the parsers' types and checks before any work
    ('img_size_0', 'train', 'main', None, _train('--img-size', '0'), 'argument --img-size: must be a positive integer'),
    ('img_smaller_than_patch', 'train', 'main', None, _train(arch=_kwargs(img=2)), 'smaller than its patch size'),
    ('patch_size_0', 'train', 'main', None, _train(arch=_kwargs(patch_size=0)), 'patch_size must be positive'),
    ('patch_size_64', 'train', 'main', None, _train(arch=_kwargs(patch_size=64)), 'smaller than its patch size 64x64'),
    ('embed_dim_negative', 'train', 'main', None, _train(arch=_kwargs(embed_dim=-8)), 'embed_dim must be positive'),
    ('num_blocks_0', 'train', 'main', None, _train(arch=_kwargs(num_blocks=0)), 'num_blocks must be positive'),
    ('model_kwargs_without_value', 'train', 'main', None, _train('--model-kwargs', 'num_blocks'),
     "--model-kwargs: expected KEY=VALUE items, got 'num_blocks'"),
    ('input_size_not_square', 'train', 'main', None, _train('--input-size', '3', '24', '16'),
     'takes 16x16 px inputs'),
    ('in_chans_1_with_rgb_mean', 'train', 'main', None, _train('--in-chans', '1', '--mean', '0.5', '0.5', '0.5'),
     '--mean needs one value per input channel (1)'),
    ('image_mode_vs_in_chans', 'train', 'main', None, _train('--input-img-mode', 'L'),
     '--input-img-mode L gives 1 channel(s)'),
    ('sched_unknown', 'train', 'main', None, _train('--sched', 'cosinex'), "--sched: invalid choice: 'cosinex'"),
    ('device_unknown', 'train', 'main', None, _train('--device', 'tpu'), "unknown device 'tpu'"),
    ('scale_one_value', 'train', 'main', None, _train('--scale', '0.5'), '--scale needs two values'),
    ('mean_two_values', 'train', 'main', None, _train('--mean', '0.5', '0.5'), '--mean needs one value per input'),
    ('interpolation_unknown', 'train', 'main', None, _train('--interpolation', 'foo'), "invalid choice: 'foo'"),
    ('seed_negative', 'train', 'main', None, _train('--seed', '-1'), 'argument --seed: must be an integer from 0'),
    ('compile_backend_unknown', 'train', 'main', None, _train('--torchcompile', 'x'),
     "unknown torch.compile backend 'x'"),
    ('aug_repeats_one_process', 'train', 'main', None, _train('--aug-repeats', '3'),
     '--aug-repeats 3 needs a distributed run'),
    ('drop_path_negative', 'train', 'main', None, _train('--drop-path', '-0.5'), 'argument --drop-path: must be a rate'),
    ('head_drop_one', 'train', 'main', None, _train('--head-drop', '1'), 'argument --head-drop: must be a rate'),
    ('recovery_interval_negative', 'train', 'main', None, _train('--recovery-interval', '-1'),
     'argument --recovery-interval: must be an integer >= 0'),
    ('augment_policy_unknown', 'train', 'main', None, _train('--aa', 'bogus'), "not a timm auto-augment policy 'bogus'"),
    ('opt_betas_one_value', 'train', 'main', None, _train('--opt', 'adamw', '--opt-betas', '0.9'),
     '--opt-betas takes 2 values'),
    ('class_map_unsupported', 'train', 'main', _text_file, _train('--class-map', '{setup}'),
     'Unsupported class map file extension'),
    ('validate_img_size_0', 'validate', 'main', None, _validate('--img-size', '0'), 'argument --img-size'),
    ('validate_model_kwargs_without_value', 'validate', 'main', None, _validate('--model-kwargs', 'embed_dim'),
     'expected KEY=VALUE'),
    # YAML values go through the same types
    ('yaml_model_kwargs_number', 'train', 'main', _yaml('model_kwargs: 5\n'), _train('--config', '{setup}'),
     "config key 'model_kwargs'"),
    ('yaml_model_kwargs_item_without_value', 'train', 'main', _yaml('model_kwargs: [num_blocks]\n'),
     _train('--config', '{setup}'), "expected KEY=VALUE items, got 'num_blocks'"),
    ('yaml_epochs_null', 'train', 'main', _yaml('epochs: null\n'), _train('--config', '{setup}'),
     "config key 'epochs'"),
    ('yaml_mean_text', 'train', 'main', _yaml('mean: abc\n'), _train('--config', '{setup}'),
     "config key 'mean'"),
    ('yaml_seed_negative', 'train', 'main', _yaml('seed: -3\n'), _train('--config', '{setup}'),
     "config key 'seed'"),
    ('yaml_not_utf8', 'train', 'main', lambda c: _write(c.tmp / 'cfg.yaml', b'model: noah\xff\n'),
     _train('--config', '{setup}'), 'is not UTF-8 text'),
    # files that are not checkpoints (a saved link), in all four tools
    ('resume_text_file', 'train', 'main', _text_file, _train('--resume', '{setup}'), 'is a text file'),
    ('initial_checkpoint_text_file', 'train', 'main', _text_file, _train('--initial-checkpoint', '{setup}'),
     'is a text file'),
    ('validate_text_file', 'validate', 'main', _text_file,
     lambda c: [c.data, '--model', TINY_MODEL, '--checkpoint', str(c.tmp / 'model.pth.tar')] + ARCH, 'is a text file'),
    ('visualize_text_file', 'visualize', 'main', lambda c: (_text_file(c), _image(c)),
     lambda c: ['--model', TINY_MODEL, '--checkpoint', str(c.tmp / 'model.pth.tar'), '--out', c.out,
                str(c.tmp / 'cat.png')], 'is a text file'),
    # pretrained weights that cannot be fetched (offline, empty cache)
    ('pretrained_offline', 'train', 'script', None,
     lambda c: [c.data, '--model', 'resmlp_12_224', '--pretrained', '--img-size', '16'] + FAST + ['--output', c.out],
     "cannot load the pretrained weights of 'resmlp_12_224'"),
    # class folders
    ('val_class_unknown_to_training', 'train', 'main', _val_only_class, _train(),
     "1 class folder(s) the model was not trained on: 'dog'"),
    ('validate_class_unknown_to_checkpoint', 'validate', 'main', _val_only_class, _validate(),
     "class folder(s) the model was not trained on: 'dog'"),
    ('empty_train_class_folder', 'train', 'main', _empty_train_class, _train(), "class folder(s) 'zebra'"),
    ('images_directly_in_train', 'train', 'main', _loose_train_images, _train(), "holds images directly ('stray.png')"),
    # unreadable images, in the main process and in loader workers, one and two processes
    ('dangling_link', 'train', 'main', _dangling_link('train'), _train('-b', '2'), 'No such file or directory'),
    ('dangling_link_in_worker', 'train', 'main', _dangling_link('train'), _train('-b', '2', '--workers', '1'),
     'gone.png'),
    ('truncated_image', 'train', 'main', _truncated_png, _train('-b', '2'), 'cut.png'),
    ('decompression_bomb', 'train', 'main', _bomb_png, _train('-b', '2'), 'DecompressionBombError'),
    ('permission_denied', 'train', 'main', _no_permission, _train('-b', '2'), 'Permission denied'),
    ('validate_dangling_link', 'validate', 'main', _dangling_link('val'), _validate(), 'gone.png'),
    ('dangling_link_two_processes', 'train', 'launcher', _dangling_link('train'),
     _train('-b', '1', '--workers', '1'), 'gone.png'),
]


def _params():
    for name, *rest in BAD_INPUTS:
        marks = []
        if name == 'permission_denied':
            marks.append(pytest.mark.skipif(os.geteuid() == 0, reason='root reads files without permission'))
        yield pytest.param(name, *rest, id=name, marks=marks)


@pytest.mark.parametrize('name, tool, how, setup, argv, fragment', list(_params()))
def test_bad_input_is_one_error_line(name, tool, how, setup, argv, fragment, ctx, capsys):
    made = setup(ctx) if setup is not None else None
    made = made[0] if isinstance(made, tuple) else made
    args = [made if a == '{setup}' else a for a in argv(ctx)]
    if how == 'main':
        code = TOOLS[tool](args)
        err = capsys.readouterr().err
    else:
        env = dict(HF_HUB_OFFLINE='1', HF_HOME=str(ctx.tmp / 'hf'))  # nothing cached, nothing fetched
        res = run_cli('distributed_train.sh', ['2'] + args, timeout=240) if how == 'launcher' \
            else run_cli(SCRIPTS[tool], args, timeout=240, env=env)
        code, err = res.returncode, res.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    if how == 'launcher':  # torchrun's agent logs the failed worker: 'E1124 17:25:27.819000 ... exitcode: 2'
        lines = [line for line in lines if not re.match(r'[IWE]\d{4} ', line)]
    assert code == 2, err[-3000:]
    assert 'Traceback' not in err
    assert len(lines) == 1 and lines[0].startswith('error'), err[-3000:]
    assert fragment in lines[0], lines[0]


def test_yaml_values_are_read_as_the_command_line_reads_them(tmp_path):
    """Through --config, a list of KEY=VALUE items equals a mapping and numbers are checked by the flags' types."""
    as_items = tmp_path / 'items.yaml'
    as_items.write_text('model_kwargs: [num_blocks=2, key_ratio=0.25]\nepochs: 3.0\nscale: [0.5, 1]\n')
    args, _ = parse_args_with_config(build_parser(), ['d', '--config', str(as_items)])
    assert args.model_kwargs == {'num_blocks': 2, 'key_ratio': 0.25}
    assert args.epochs == 3 and isinstance(args.epochs, int) and args.scale == [0.5, 1.0]
    as_mapping = tmp_path / 'mapping.yaml'
    as_mapping.write_text(yaml.safe_dump({'model_kwargs': {'num_blocks': 2, 'key_ratio': 0.25}}))
    assert parse_args_with_config(build_parser(), ['d', '-c', str(as_mapping)])[0].model_kwargs == args.model_kwargs
    # the image mode follows --in-chans, as in timm's train.py
    assert parse_args_with_config(build_parser(), ['d', '--in-chans', '1'])[0].input_img_mode == 'L'


# ------------------------------------------------------------------------------------ class mapping
def _top1(rows):
    return float(rows[-1]['eval_top1'])


def test_class_missing_from_val_keeps_training_labels(tmp_path, capsys):
    """class0 has no val images: the other classes keep their training labels in train.py's evaluation and in
    validate.py's (through the checkpoint's class names); numbered on their own (0, 1), a model that is right on
    every image would score 0%."""
    data = make_image_folder(str(tmp_path / 'd'), classes=3, train_per_class=8, val_per_class=3)
    shutil.rmtree(os.path.join(data, 'val', 'class0'))
    out = str(tmp_path / 'o')
    assert train_mod.main([data] + TINY + FAST + ['--epochs', '3', '--output', out, '--experiment', 'e',
                                                   '--smoothing', '0']) == 0
    log = capsys.readouterr().out
    assert "no images in" in log and "'class0'" in log
    ckpt = os.path.join(out, 'e', 'last.pth.tar')
    assert safe_load(ckpt)['class_names'] == ['class0', 'class1', 'class2']
    on_train = validate_mod.validate([data, '--split', 'train', '--model', TINY_MODEL, '--checkpoint', ckpt,
                                      '--workers', '0'])
    assert on_train['top1'] == 100.0  # the model knows every class
    with open(os.path.join(out, 'e', 'summary.csv'), newline='') as f:
        assert _top1(list(csv.DictReader(f))) == 100.0
    on_val = validate_mod.validate([data, '--model', TINY_MODEL, '--checkpoint', ckpt, '--workers', '0'])
    assert on_val['top1'] == 100.0 and on_val['images'] == 6


def test_odd_but_legal_class_counts_warn(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / 'd'), classes=1, train_per_class=8, val_per_class=1)
    code = train_mod.main([data] + TINY + FAST + ['--epochs', '1', '--num-classes', '3', '--output', str(tmp_path / 'o')])
    out = capsys.readouterr().out
    assert code == 0
    assert 'a single class folder' in out
    assert '--num-classes 3 but the dataset has 1 classes' in out


# ------------------------------------------------------------------------------------ files
def test_validate_reads_safetensors_weights(pristine, checkpoint, tmp_path):
    """A .safetensors file (timm's hub format) loads as weights, with the same metrics as the checkpoint."""
    from safetensors.torch import save_file
    weights = str(tmp_path / 'model.safetensors')
    save_file(safe_load(checkpoint)['state_dict'], weights)
    common = [pristine, '--model', TINY_MODEL, '--workers', '0', '--num-classes', '3'] + ARCH
    from_ckpt = validate_mod.validate(common + ['--checkpoint', checkpoint])
    from_safetensors = validate_mod.validate(common + ['--checkpoint', weights])
    assert from_safetensors['top1'] == from_ckpt['top1'] and from_safetensors['loss'] == from_ckpt['loss']


def test_visualize_draws_a_class_name_that_is_not_utf8(checkpoint, ctx):
    """A class folder named with non-UTF-8 bytes (recorded by train.py with Python's surrogate escapes) is
    drawn with its undecodable byte as \\xNN instead of crashing the figure."""
    import torch
    ckpt = safe_load(checkpoint)
    ckpt['class_names'] = [os.fsdecode(b'caf\xe9')] + ckpt['class_names'][1:]
    path = str(ctx.tmp / 'latin1.pth.tar')
    torch.save(ckpt, path)
    assert visualize_mod._label(ckpt['class_names'], 0) == 'caf\\xe9 (0)'
    out = str(ctx.tmp / 'figures')
    assert visualize_mod.main(['--model', TINY_MODEL, '--checkpoint', path, '--topk', '3', '--out', out,
                               _image(ctx)]) == 0
    assert os.listdir(out) == ['cat_attention.png']


def test_readme_reliability_list_names_real_tests():
    """Every test the README's Reliability list names exists: `[case]` rows of BAD_INPUTS, test_* functions."""
    from noah_train_helpers import REPO
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    section = readme.split('### Reliability', 1)[1].split('\n#', 1)[0]
    cases = set(re.findall(r'`\[(\w+)\]`', section)) - {'case'}  # minus the legend, `[case]`
    tests = set(re.findall(r'`(?:[\w/]+\.py::)?(test_\w+)', section))
    assert cases and tests
    assert cases <= {row[0] for row in BAD_INPUTS}, cases - {row[0] for row in BAD_INPUTS}
    defined = set()
    for name in os.listdir(os.path.join(REPO, 'tests')):
        if name.endswith('.py'):
            with open(os.path.join(REPO, 'tests', name), encoding='utf-8') as f:
                defined |= set(re.findall(r'^def (test_\w+)', f.read(), flags=re.M))
    assert tests <= defined, tests - defined
