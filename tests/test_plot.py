"""noah_mlp.plot: training curves from summary.csv, drawn by train.py at the end and by `noah-plot`."""
import csv
import os
import subprocess
import sys

import pytest
from PIL import Image

from noah_mlp import plot
from noah_mlp.errors import UserError

from noah_train_helpers import FAST, REPO, TINY, make_image_folder, run_cli

ROWS = [
    dict(epoch=0, train_loss=1.2, eval_loss=1.1, eval_top1=40.0, eval_top5=90.0, lr=1e-3,
         ema_eval_loss=1.15, ema_eval_top1=35.0, ema_eval_top5=88.0),
    dict(epoch=1, train_loss=0.9, eval_loss=0.8, eval_top1=60.0, eval_top5=95.0, lr=5e-4,
         ema_eval_loss=0.95, ema_eval_top1=55.0, ema_eval_top5=93.0),
    dict(epoch=2, train_loss=0.7, eval_loss=0.75, eval_top1=70.0, eval_top5=100.0, lr=1e-4,
         ema_eval_loss=0.8, ema_eval_top1=66.0, ema_eval_top5=99.0),
]


def write_summary(folder, rows, fields=None):
    os.makedirs(folder, exist_ok=True)
    fields = fields or list(rows[0])
    with open(os.path.join(folder, 'summary.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    return str(folder)


def plotted(fig):
    """{legend label: (x, y)} of every curve, per panel title."""
    return {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
            for ax in fig.axes}


def test_png_of_the_summary_curves_with_ema(tmp_path):
    run = write_summary(tmp_path / 'run', ROWS)
    path = plot.plot_training_curves(run)
    assert path == tmp_path / 'run' / 'training_curves.png'
    with Image.open(path) as img:
        assert img.format == 'PNG' and img.size == (1350, 400)
    curves = plotted(plot.training_curves_figure(plot.read_summary(run)))
    epochs = [0., 1., 2.]
    assert curves['loss'] == {'train': (epochs, [1.2, 0.9, 0.7]), 'eval': (epochs, [1.1, 0.8, 0.75]),
                              'eval, EMA weights': (epochs, [1.15, 0.95, 0.8])}
    assert curves['top-1 / top-5 (%)']['top-1'] == (epochs, [40., 60., 70.])
    assert curves['top-1 / top-5 (%)']['top-1, EMA weights'] == (epochs, [35., 55., 66.])
    assert curves['top-1 / top-5 (%)']['top-5, EMA weights'] == (epochs, [88., 93., 99.])
    assert curves['learning rate'] == {'lr at the end of the epoch': (epochs, [1e-3, 5e-4, 1e-4])}


def test_without_ema_columns_there_are_no_ema_curves(tmp_path):
    fields = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    run = write_summary(tmp_path / 'run', ROWS[:1], fields)
    curves = plotted(plot.training_curves_figure(plot.read_summary(run)))
    assert set(curves['loss']) == {'train', 'eval'}
    assert set(curves['top-1 / top-5 (%)']) == {'top-1', 'top-5'}
    out = plot.plot_training_curves(run, tmp_path / 'elsewhere.png')
    assert out.is_file() and not (tmp_path / 'run' / 'training_curves.png').exists()


@pytest.mark.parametrize('setup,fragment', [
    (lambda d: None, 'run folder not found'),
    (lambda d: os.makedirs(d), 'no summary.csv'),
    (lambda d: write_summary(d, [], ['epoch', 'train_loss']), 'no epoch rows yet'),
])
def test_noah_plot_errors_are_one_line(tmp_path, setup, fragment):
    run = str(tmp_path / 'run')
    setup(run)
    with pytest.raises(UserError, match=fragment):
        plot.plot_training_curves(run)
    proc = subprocess.run([sys.executable, '-m', 'noah_mlp.plot', run], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith('error: ')
    assert fragment in proc.stderr


def test_noah_plot_command_prints_the_png_path(tmp_path):
    run = write_summary(tmp_path / 'run', ROWS)
    proc = subprocess.run([sys.executable, '-m', 'noah_mlp.plot', run], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == os.path.join(run, 'training_curves.png')


def test_plot_after_training_without_matplotlib_logs_a_note(tmp_path, monkeypatch):
    run = write_summary(tmp_path / 'run', ROWS)
    notes = []
    monkeypatch.setattr(plot._logger, 'info', notes.append)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib -> ImportError
    assert plot.plot_after_training(run) is None
    assert notes == ['note: no training_curves.png (matplotlib is not installed: pip install matplotlib).']
    assert not (tmp_path / 'run' / 'training_curves.png').exists()


def test_train_draws_the_curves_at_the_end(tmp_path):
    data = make_image_folder(str(tmp_path / 'data'))
    out = str(tmp_path / 'out')
    res = run_cli('train.py', [data] + TINY + FAST + ['--epochs', '2', '--output', out, '--experiment', 'run',
                                                     '--model-ema', '--model-ema-decay', '0.5'])
    assert res.returncode == 0, res.stderr[-2000:]
    png = os.path.join(out, 'run', 'training_curves.png')
    assert f'Training curves: {png}' in res.stdout
    with Image.open(png) as img:
        assert img.size == (1350, 400)
    curves = plotted(plot.training_curves_figure(plot.read_summary(os.path.join(out, 'run'))))
    assert curves['loss']['train'][0] == [0., 1.] and 'eval, EMA weights' in curves['loss']
