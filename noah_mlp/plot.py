"""Training curves from a run's summary.csv, and the `noah-plot` command.

    noah-plot output/train/my_run            # writes output/train/my_run/training_curves.png

Three panels, one point per epoch: loss (training, evaluation), top-1 and top-5 (evaluation) and the
learning rate; with --model-ema the EMA weights' evaluation loss and top-1 / top-5 are drawn too
(the `ema_*` columns). `train.py` draws the same picture at the end of training (rank 0, when
matplotlib is installed). Drawing uses matplotlib's object-oriented API on an Agg canvas: no display.
"""
import argparse
import csv
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from .errors import UserError, cli_main

__all__ = ['PLOT_FILE', 'SUMMARY_FILE', 'read_summary', 'training_curves_figure', 'plot_training_curves',
           'plot_after_training', 'main']

_logger = logging.getLogger('noah_mlp.plot')

SUMMARY_FILE = 'summary.csv'
PLOT_FILE = 'training_curves.png'
FIGSIZE, DPI = (13.5, 4.0), 100  # 1350 x 400 px

# panel -> [(summary.csv column, legend label, line style)]
PANELS = {
    'loss': [('train_loss', 'train', '-'), ('eval_loss', 'eval', '-'), ('ema_eval_loss', 'eval, EMA weights', '--')],
    'top-1 / top-5 (%)': [('eval_top1', 'top-1', '-'), ('eval_top5', 'top-5', ':'),
                          ('ema_eval_top1', 'top-1, EMA weights', '--'), ('ema_eval_top5', 'top-5, EMA weights', '-.')],
    'learning rate': [('lr', 'lr at the end of the epoch', '-')],
}


def read_summary(run_dir: Union[str, os.PathLike]) -> Dict[str, List[float]]:
    """The numeric columns of `run_dir/summary.csv`, one value per epoch (empty cells become NaN).

    Raises UserError when the folder, the file or its rows are missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f'run folder not found: {run_dir}')
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        raise UserError(f'no {SUMMARY_FILE} in {run_dir}: is it a train.py output folder that finished an epoch?')
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or 'epoch' not in rows[0]:
        raise UserError(f'{path} has no epoch rows yet: nothing to plot.')
    columns: Dict[str, List[float]] = {}
    for name in rows[0]:
        try:
            columns[name] = [float(r[name]) if r.get(name) not in (None, '') else float('nan') for r in rows]
        except ValueError:
            continue  # a text column: not a curve
    if 'epoch' not in columns:
        raise UserError(f'{path}: the epoch column is not numeric.')
    return columns


def training_curves_figure(columns: Dict[str, List[float]], title: str = ''):
    """A matplotlib Figure (Agg canvas) of the curves in `columns` (as `read_summary` returns them)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS), squeeze=True)
    epochs = columns['epoch']
    for ax, (panel, curves) in zip(axes, PANELS.items()):
        for column, label, style in curves:
            if column in columns:
                ax.plot(epochs, columns[column], style, marker='o', markersize=3, label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if panel == 'learning rate':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 3))
        if ax.lines:
            ax.legend(fontsize=8)
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_training_curves(run_dir: Union[str, os.PathLike], out: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Write the curves of `run_dir/summary.csv` as a PNG (default `run_dir/training_curves.png`)."""
    columns = read_summary(run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError('noah-plot needs matplotlib: pip install "noah-mlp[viz]" (or pip install matplotlib).') \
            from None
    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    fig = training_curves_figure(columns, title=f'{Path(run_dir).resolve().name}: {len(columns["epoch"])} epoch(s)')
    tmp = out.with_name(f'.{out.name}.tmp')
    fig.savefig(tmp, format='png')
    os.replace(tmp, out)  # a reader never sees half a picture
    return out


def plot_after_training(run_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """train.py's finish stage: draw the curves, or log why not; never fails the finished run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _logger.info('note: no training_curves.png (matplotlib is not installed: pip install matplotlib).')
        return None
    try:
        path = plot_training_curves(run_dir)
    except (UserError, OSError, ValueError) as e:
        _logger.warning(f'note: could not draw the training curves: {e}')
        return None
    _logger.info(f'Training curves: {path}')
    return path


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='noah-plot', description='Draw the loss, top-1 / top-5 and learning-rate curves of a train.py run '
                                      '(its summary.csv) as a PNG.')
    p.add_argument('run_dir', metavar='RUN_DIR', help='a train.py output folder (holds summary.csv)')
    p.add_argument('--out', default=None, metavar='FILE', help=f'PNG to write (default: RUN_DIR/{PLOT_FILE})')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `noah-plot` / `python -m noah_mlp.plot`; returns the exit status."""
    args = _build_parser().parse_args(argv)

    def run() -> int:
        print(plot_training_curves(args.run_dir, args.out))
        return 0

    return cli_main(run)


if __name__ == '__main__':
    sys.exit(main())
