"""noah_mlp.visualize: attention figures and the noah-visualize command."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import noah_mlp  # noqa: F401  (registers the models)
from noah_mlp import visualize as viz
from noah_mlp.attention import noah_attention

ARCH = dict(patch_size=8, num_blocks=2, embed_dim=32)
NAMES = ['circle', 'square', 'triangle', 'star', 'cross']


def tiny(num_classes=5, img_size=32, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model('noah_gmlp_ti16_224', img_size=img_size, num_classes=num_classes, **ARCH, **kwargs)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def write_images(folder, count=2, size=40):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f'img{i}.png'
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def figure_size(model, topk):
    """Pixel size of one figure: 2 in per panel, columns = image + N groups + mean, colour bars, 100 dpi."""
    n = model.head.num_heads
    return int(round((2.0 * (n + 2) + viz.COLORBAR_WIDTH) * 100)), int(round((2.0 * topk + 0.8) * 100))


def test_write_figures_from_tensor(tmp_path):
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    paths = viz.write_attention_figures(model, x, tmp_path / 'out', class_names=NAMES, topk=2, names=['a', 'b', 'a'])
    assert [p.name for p in paths] == ['a_attention.png', 'b_attention.png', 'a_1_attention.png']
    for p in paths:
        with Image.open(p) as img:
            assert img.format == 'PNG'
            assert img.size == figure_size(model, 2)
            pixels = np.asarray(img.convert('RGB'))
        assert pixels.std() > 10  # something was drawn
    assert not model.training


def test_figure_labels_rows_with_names_and_probabilities():
    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    att = noah_attention(model, x, topk=3)
    image = viz._to_display(x, (0.5,) * 3, (0.5,) * 3)[0]
    fig = viz.attention_figure(image, att, 0, NAMES)
    axes = np.array(fig.axes[:3 * (model.head.num_heads + 2)]).reshape(3, model.head.num_heads + 2)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    for row in range(3):
        c = int(att.classes[0, row])
        label = axes[row, 0].get_ylabel()
        assert NAMES[c] in label and f'{float(probs[c]):.1%}' in label
    titles = [ax.get_title() for ax in axes[0]]
    assert titles == ['input', 'group 1', 'group 2', 'group 3', 'group 4', 'mean of 4 groups']
    # each map panel carries its share of the logit; the mean column carries the whole logit
    logit = float(att.logits[0, int(att.classes[0, 0])])
    assert f'logit {logit:+.2f} = sum of the 4 groups' in axes[0, -1].texts[0].get_text()


def test_figure_speaks_plain_words_and_has_a_colour_bar_per_row():
    """Peaks in multiples of a uniform map, each group's part of the logit, and one colour bar per row
    whose scale is that of the row's maps (x a uniform map, 0 to the row's highest weight)."""
    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    att = noah_attention(model, x, topk=2)
    image = viz._to_display(x, (0.5,) * 3, (0.5,) * 3)[0]
    fig = viz.attention_figure(image, att, 0, NAMES)
    N = model.head.num_heads
    L = att.maps.shape[-1] * att.maps.shape[-2]
    axes = np.array(fig.axes[:2 * (N + 2)]).reshape(2, N + 2)
    bars = fig.axes[2 * (N + 2):]
    assert len(bars) == 2 and all(bar.get_ylabel() == 'x a uniform map' for bar in bars)
    for row in range(2):
        maps = att.maps[0, :, row]  # (N, H', W')
        parts = (maps * att.values[0, :, row]).sum((-1, -2))
        for n in range(N):
            text = axes[row, n + 1].texts[0].get_text()
            assert text == (f'peak {viz._times(float(maps[n].max()) * L)} a uniform map\n'
                            f'adds {float(parts[n]):+.2f} to the logit')
        row_max = float(torch.cat([maps, maps.mean(0, keepdim=True)]).max()) * L
        overlay = axes[row, 1].images[-1]
        assert overlay.get_clim() == pytest.approx((0., row_max))
        assert bars[row].get_ylim() == pytest.approx((0., row_max))
    assert viz._times(35.2) == '35x' and viz._times(1.46) == '1.5x'


def test_title_names_the_settings_the_model_was_built_with(tmp_path, monkeypatch):
    model = tiny(num_classes=5, img_size=48, noah_head_num=2, key_ratio=0.25)
    assert viz.describe_model(model) == 'noah_gmlp_ti16_224 (48x48 px, 6x6 tokens, N=2 groups, r=0.25, 5 classes)'
    seen = []
    original = viz.attention_figure
    monkeypatch.setattr(viz, 'attention_figure', lambda *a, **kw: seen.append(kw['title']) or original(*a, **kw))
    viz.write_attention_figures(model, torch.randn(1, 3, 48, 48), tmp_path, topk=1)
    assert seen == ['noah_gmlp_ti16_224 (48x48 px, 6x6 tokens, N=2 groups, r=0.25, 5 classes): image_000 - '
                    'where each NOAH group looks for the top 1 class']


def test_write_figures_from_files_and_grayscale(tmp_path):
    model = tiny()
    files = write_images(tmp_path, 2, size=50)
    paths = viz.write_attention_figures(model, files, tmp_path / 'out', topk=1)
    assert [p.name for p in paths] == ['img0_attention.png', 'img1_attention.png']
    assert all(p.is_file() for p in paths)

    gray = tiny(in_chans=1)
    paths = viz.write_attention_figures(gray, files[:1], tmp_path / 'gray', topk=5)
    with Image.open(paths[0]) as img:
        assert img.size == figure_size(gray, 5)


def test_class_names():
    names = viz.default_class_names(1000)
    assert len(names) == 1000 and names[0] == 'tench' and names[1] == 'goldfish'
    assert viz.default_class_names(5) is None


def save_checkpoint(path, model, **extra):
    torch.save({'state_dict': model.state_dict(), 'epoch': 3, **extra}, path)
    return str(path)


@pytest.fixture
def record_names(monkeypatch):
    seen = []
    original = viz.attention_figure

    def recording(image, att, index=0, class_names=None, **kwargs):
        seen.append(class_names)
        return original(image, att, index, class_names, **kwargs)

    monkeypatch.setattr(viz, 'attention_figure', recording)
    return seen


def test_cli_with_training_checkpoint(tmp_path, capsys, record_names, monkeypatch):
    model = tiny()
    ckpt = save_checkpoint(
        tmp_path / 'model_best.pth.tar', model, class_names=NAMES,
        args=argparse.Namespace(model='noah_gmlp_ti16_224', img_size=32, num_classes=5, model_kwargs=ARCH,
                                crop_pct=1.0, mean=None, std=None, interpolation=''))
    configs = []
    original = viz.preprocess_images

    def recording(model, images, transform=None, data_config=None):
        configs.append(data_config)
        return original(model, images, transform=transform, data_config=data_config)

    monkeypatch.setattr(viz, 'preprocess_images', recording)
    files = write_images(tmp_path, 2)
    out = tmp_path / 'out'
    rc = viz.main(['--model', 'noah_gmlp_ti16_224', '--checkpoint', ckpt, '--topk', '2', '--out', str(out)] + files)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    written = sorted(out.glob('*.png'))
    assert [p.name for p in written] == ['img0_attention.png', 'img1_attention.png']
    assert captured.out.split() == [str(p) for p in written]
    with Image.open(written[0]) as img:
        assert img.size == figure_size(model, 2)
    assert record_names == [NAMES, NAMES]
    assert configs and all(c['crop_pct'] == 1.0 for c in configs)  # preprocessed as in training


def test_cli_bare_state_dict_with_options(tmp_path, capsys, record_names):
    model = tiny(num_classes=1000, img_size=48)
    ckpt = tmp_path / 'weights.pth'
    torch.save(model.state_dict(), ckpt)
    files = write_images(tmp_path, 1)
    # ImageNet-sized head: ImageNet names from timm
    rc = viz.main(files + ['--model', 'noah_gmlp_ti16_224', '--checkpoint', str(ckpt), '--img-size', '48', '--out',
                           str(tmp_path / 'a'), '--model-kwargs', 'patch_size=8', 'num_blocks=2', 'embed_dim=32'])
    assert rc == 0, capsys.readouterr().err
    assert record_names[-1][0] == 'tench'

    # a names file wins; --num-classes is what the weights need
    small = tiny(num_classes=5, img_size=48)
    torch.save(small.state_dict(), ckpt)
    names_file = tmp_path / 'names.txt'
    names_file.write_text('\n'.join(NAMES) + '\n')
    rc = viz.main(files + ['--model', 'noah_gmlp_ti16_224', '--checkpoint', str(ckpt), '--img-size', '48',
                           '--num-classes', '5', '--class-names', str(names_file), '--topk', '9',
                           '--out', str(tmp_path / 'b'), '--model-kwargs', 'patch_size=8', 'num_blocks=2',
                           'embed_dim=32'])
    assert rc == 0, capsys.readouterr().err
    assert record_names[-1] == NAMES
    with Image.open(tmp_path / 'b' / 'img0_attention.png') as img:
        assert img.size == figure_size(small, 5)  # topk capped at the number of classes


def _cli_error(argv, capsys):
    rc = viz.main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert 'Traceback' not in err
    return lines[0]


def test_cli_errors(tmp_path, capsys):
    model = tiny()
    ckpt = save_checkpoint(tmp_path / 'ckpt.pth', model, class_names=NAMES,
                           args=argparse.Namespace(img_size=32, num_classes=5, model_kwargs=ARCH))
    files = write_images(tmp_path, 1)
    base = ['--model', 'noah_gmlp_ti16_224', '--checkpoint', ckpt, '--out', str(tmp_path / 'out')]

    assert 'image not found' in _cli_error(base + [str(tmp_path / 'missing.jpg')], capsys)
    not_an_image = tmp_path / 'notes.png'
    not_an_image.write_text('not a picture')
    assert 'cannot read image' in _cli_error(base + [str(not_an_image)], capsys)
    assert "unknown model 'noah_nothing'" in _cli_error(
        ['--model', 'noah_nothing', '--checkpoint', ckpt, '--out', str(tmp_path)] + files, capsys)
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'\x00\x01 definitely not a checkpoint')
    assert 'is corrupt or not a PyTorch checkpoint' in _cli_error(
        ['--model', 'noah_gmlp_ti16_224', '--checkpoint', str(garbage), '--out', str(tmp_path)] + files, capsys)
    assert 'checkpoint not found' in _cli_error(
        ['--model', 'noah_gmlp_ti16_224', '--checkpoint', str(tmp_path / 'nope.pth'), '--out', str(tmp_path)] + files,
        capsys)
    # weights for another number of classes
    msg = _cli_error(base[:4] + ['--num-classes', '6', '--class-names', os.devnull, '--out', str(tmp_path)] + files,
                     capsys)
    assert 'class names' in msg
    msg = _cli_error(base[:4] + ['--num-classes', '6', '--out', str(tmp_path)] + files, capsys)
    assert 'class names for a model with 6 classes' in msg
    wrong = tiny(num_classes=6)
    ckpt6 = save_checkpoint(tmp_path / 'six.pth', wrong, args=argparse.Namespace(img_size=32, model_kwargs=ARCH))
    msg = _cli_error(['--model', 'noah_gmlp_ti16_224', '--checkpoint', ckpt6, '--num-classes', '5', '--out',
                      str(tmp_path)] + files, capsys)
    assert 'cannot load' in msg and 'size mismatch' in msg
    # a linear-head model has no attention maps
    assert 'not a NOAH model' in _cli_error(
        ['--model', 'gmlp_ti16_050_224', '--checkpoint', ckpt, '--out', str(tmp_path)] + files, capsys)
    assert not (tmp_path / 'out').exists()


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'noah_mlp.visualize', '--model', 'noah_gmlp_ti16_224', '--checkpoint',
         str(tmp_path / 'none.pth'), '--out', str(tmp_path), str(tmp_path / 'none.jpg')],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f'error: image not found: {tmp_path / "none.jpg"}'


def test_preprocessing_follows_training_args(tmp_path):
    model = tiny()
    cfg = viz._data_config(model, {'crop_pct': 1.0, 'mean': None, 'interpolation': ''})
    assert cfg['crop_pct'] == 1.0 and cfg['input_size'] == (3, 32, 32)
    assert cfg['mean'] == (0.5, 0.5, 0.5) and cfg['interpolation'] == 'bicubic'  # the model's cfg
    # with crop_pct 1.0 a 32 px image reaches the model untouched (up to normalisation)
    pixels = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    x = viz.preprocess_images(model, [Image.fromarray(pixels)], data_config={'crop_pct': 1.0})
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    torch.testing.assert_close(x[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(viz._to_display(x, cfg['mean'], cfg['std'])[0]),
                               torch.from_numpy(pixels).float().div(255), atol=1e-5, rtol=0)


def test_load_noah_model_for_notebooks(tmp_path):
    model = tiny()
    ckpt = save_checkpoint(tmp_path / 'last.pth.tar', model, class_names=NAMES,
                           args=argparse.Namespace(img_size=32, num_classes=5, model_kwargs=ARCH, crop_pct=0.95))
    loaded = viz.load_noah_model('noah_gmlp_ti16_224', ckpt)
    assert loaded.class_names == NAMES and loaded.data_config['crop_pct'] == 0.95
    assert not loaded.model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    with pytest.raises(ValueError, match='checkpoint not found'):
        viz.load_noah_model('noah_gmlp_ti16_224', str(tmp_path / 'missing.pth'))
