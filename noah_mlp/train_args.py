"""Command-line flags of ``noah-train`` / ``train.py``: timm train.py's names, grouped as timm groups them.

Kept apart from the training logic (`noah_mlp.train`) so the flag set can be read, tested against
timm's and documented on its own.
"""
import argparse
import os

from .cli_common import default_loader_workers
from .config import (
    INTERPOLATIONS, SCHEDULERS, ArgumentParser, KeyValueAction, area_fraction, augment_policy, check_image_args,
    compile_backend, device_name, drop_rate, non_negative_float, non_negative_int, positive_float, positive_int,
    probability, seed_int)
from .errors import UserError

__all__ = ['build_parser', 'check_train_args']


def _check_range_pair(args: argparse.Namespace, flag: str, upper: float = float('inf')) -> None:
    values = getattr(args, flag.lstrip('-').replace('-', '_'))
    if values is None:
        return
    if len(values) != 2 or not values[0] <= values[1] <= upper:
        raise UserError(f'{flag} needs two values LOW HIGH with LOW <= HIGH{" <= 1" if upper == 1 else ""}, '
                        f'got {" ".join(map(str, values))}.')


def check_train_args(args: argparse.Namespace) -> None:
    """Checks across training flags (single values are checked by their types)."""
    _check_range_pair(args, '--scale', upper=1.)
    _check_range_pair(args, '--ratio')
    _check_range_pair(args, '--cutmix-minmax', upper=1.)
    if args.opt_betas is not None and len(args.opt_betas) not in (2, 3):
        raise UserError(f'--opt-betas takes 2 values (3 for Adan-style optimizers), got {len(args.opt_betas)}.')
    if args.lr_noise is not None and len(args.lr_noise) > 2:
        raise UserError(f'--lr-noise takes one or two epochs (or fractions), got {len(args.lr_noise)} values.')
    if args.aug_repeats and int(os.environ.get('WORLD_SIZE', '1')) < 2:
        # timm.data.create_loader: RepeatAugSampler splits the repeated samples over the processes
        raise UserError(f'--aug-repeats {args.aug_repeats} needs a distributed run (2 or more processes): timm\'s '
                        f'repeated-augmentation sampler spreads each image\'s repeats over the processes.')


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog='train.py', description='Train timm / NOAH image classifiers (timm train.py flags).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        checks=[check_image_args, check_train_args])
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of defaults (keys: flag names with _)')
    g = p.add_argument_group('Dataset')
    g.add_argument('data', nargs='?', metavar='DIR', help='dataset root (ImageFolder: train/ and val/ or validation/)')
    g.add_argument('--data-dir', metavar='DIR', default=None, help='dataset root (instead of the positional DIR)')
    g.add_argument('--dataset', metavar='NAME', default='', help='timm dataset spec (empty: ImageFolder)')
    g.add_argument('--dataset-download', action='store_true', default=False,
                   help='let torch/ and tfds/ datasets download themselves')
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation')
    g.add_argument('--class-map', default='', metavar='FILE')
    g.add_argument('--input-img-mode', default=None, metavar='MODE', help='PIL mode (default: L for 1 channel, else RGB)')
    g = p.add_argument_group('Model')
    g.add_argument('--model', default='', metavar='NAME', help='timm model name, e.g. noah_gmlp_ti16_224')
    g.add_argument('--pretrained', action='store_true', default=False)
    g.add_argument('--pretrained-path', default=None, metavar='FILE',
                   help="load FILE as the model's pretrained weights, head adapted (implies --pretrained)")
    g.add_argument('--noah-head', action='store_true', default=False,
                   help='replace the classifier of any timm --model by a NOAH head (noah_mlp.add_noah_head)')
    g.add_argument('--initial-checkpoint', default='', metavar='PATH', help='load these weights before training')
    g.add_argument('--resume', default='', metavar='PATH', help='resume model, optimizer, EMA, scaler, schedule')
    g.add_argument('--no-resume-opt', action='store_true', default=False)
    g.add_argument('--num-classes', type=positive_int, default=None, metavar='N', help='default: classes in the dataset')
    g.add_argument('--gp', default=None, metavar='POOL')
    g.add_argument('--img-size', type=positive_int, default=None, metavar='N', help='train and build the model at N px')
    g.add_argument('--in-chans', type=positive_int, default=None, metavar='N')
    g.add_argument('--input-size', default=None, nargs=3, type=positive_int, metavar='N')
    g.add_argument('--crop-pct', default=None, type=positive_float, metavar='PCT', help='eval crop ratio')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    g.add_argument('--std', type=positive_float, nargs='+', default=None, metavar='STD')
    g.add_argument('--interpolation', default='', choices=('',) + INTERPOLATIONS, metavar='NAME',
                   help=f'eval resize ({", ".join(INTERPOLATIONS)}; default: the model\'s)')
    g.add_argument('-b', '--batch-size', type=positive_int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=positive_int, default=None, metavar='N')
    g.add_argument('--channels-last', action='store_true', default=False)
    g.add_argument('--grad-accum-steps', type=positive_int, default=1, metavar='N')
    g.add_argument('--grad-checkpointing', action='store_true', default=False)
    g.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValueAction, metavar='KEY=VALUE',
                   help='extra model arguments, e.g. num_blocks=2 embed_dim=64 patch_size=4')
    g.add_argument('--torchcompile', nargs='?', type=compile_backend, default=None, const='inductor', metavar='BACKEND')
    g = p.add_argument_group('Device & distributed')
    g.add_argument('--device', default='auto', type=device_name, help='auto: CUDA when present, else CPU')
    g.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    g.add_argument('--amp', action='store_true', default=False, help='automatic mixed precision')
    g.add_argument('--amp-dtype', default=None, choices=['bfloat16', 'float16'],
                   help='default: float16 on CUDA, bfloat16 on CPU')
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='no DDP buffer broadcast')
    g.add_argument('--local-rank', '--local_rank', default=0, type=non_negative_int, help=argparse.SUPPRESS)
    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', metavar='NAME')
    g.add_argument('--opt-eps', default=None, type=positive_float, metavar='EPS')
    g.add_argument('--opt-betas', default=None, type=drop_rate, nargs='+', metavar='BETA')
    g.add_argument('--momentum', type=non_negative_float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=non_negative_float, default=2e-5)
    g.add_argument('--clip-grad', type=positive_float, default=None, metavar='NORM')
    g.add_argument('--clip-mode', type=str, default='norm', choices=['norm', 'value', 'agc'])
    g.add_argument('--layer-decay', type=positive_float, default=None)
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=KeyValueAction, metavar='KEY=VALUE')
    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', default='cosine', choices=SCHEDULERS, metavar='NAME', help=f'{", ".join(SCHEDULERS)}')
    g.add_argument('--sched-on-updates', action='store_true', default=False)
    g.add_argument('--lr', type=non_negative_float, default=None, metavar='LR', help='absolute lr (default: from --lr-base)')
    g.add_argument('--lr-base', type=non_negative_float, default=0.1, metavar='LR')
    g.add_argument('--lr-base-size', type=positive_int, default=256, metavar='N')
    g.add_argument('--lr-base-scale', default='', choices=('', 'linear', 'sqrt'), metavar='SCALE', help='linear or sqrt')
    g.add_argument('--lr-noise', type=non_negative_float, nargs='+', default=None, metavar='PCT')
    g.add_argument('--lr-noise-pct', type=float, default=0.67)
    g.add_argument('--lr-noise-std', type=float, default=1.0)
    g.add_argument('--lr-cycle-mul', type=float, default=1.0)
    g.add_argument('--lr-cycle-decay', type=float, default=0.5)
    g.add_argument('--lr-cycle-limit', type=positive_int, default=1)
    g.add_argument('--lr-k-decay', type=float, default=1.0)
    g.add_argument('--warmup-lr', type=non_negative_float, default=1e-5)
    g.add_argument('--min-lr', type=non_negative_float, default=0)
    g.add_argument('--epochs', type=positive_int, default=300)
    g.add_argument('--epoch-repeats', type=non_negative_float, default=0.)
    g.add_argument('--start-epoch', default=None, type=non_negative_int)
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=non_negative_int, nargs='+')
    g.add_argument('--decay-epochs', type=positive_float, default=90)
    g.add_argument('--warmup-epochs', type=non_negative_int, default=5)
    g.add_argument('--warmup-prefix', action='store_true', default=False)
    g.add_argument('--cooldown-epochs', type=non_negative_int, default=0)
    g.add_argument('--patience-epochs', type=non_negative_int, default=10)
    g.add_argument('--decay-rate', '--dr', type=non_negative_float, default=0.1)
    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--no-aug', action='store_true', default=False)
    g.add_argument('--train-crop-mode', default=None, choices=('rrc', 'rkrc', 'rkrr'))
    g.add_argument('--scale', type=area_fraction, nargs='+', default=[0.08, 1.0])
    g.add_argument('--ratio', type=positive_float, nargs='+', default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=probability, default=0.5)
    g.add_argument('--vflip', type=probability, default=0.)
    g.add_argument('--color-jitter', type=non_negative_float, default=0.4)
    g.add_argument('--color-jitter-prob', type=probability, default=None)
    g.add_argument('--grayscale-prob', type=probability, default=None)
    g.add_argument('--gaussian-blur-prob', type=probability, default=None)
    g.add_argument('--aa', type=augment_policy, default=None, help='auto augment, e.g. rand-m6-n3-mstd1.0-inc1')
    g.add_argument('--aug-repeats', type=non_negative_int, default=0)
    g.add_argument('--aug-splits', type=non_negative_int, default=0, help='not supported (must be 0)')
    g.add_argument('--jsd-loss', action='store_true', default=False, help='not supported')
    g.add_argument('--bce-loss', action='store_true', default=False)
    g.add_argument('--bce-target-thresh', type=probability, default=None)
    g.add_argument('--reprob', type=probability, default=0.)
    g.add_argument('--remode', default='pixel', choices=('const', 'rand', 'pixel'))
    g.add_argument('--recount', type=positive_int, default=1)
    g.add_argument('--resplit', action='store_true', default=False)
    g.add_argument('--mixup', type=non_negative_float, default=0.0)
    g.add_argument('--cutmix', type=non_negative_float, default=0.0)
    g.add_argument('--cutmix-minmax', type=area_fraction, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=probability, default=1.0)
    g.add_argument('--mixup-switch-prob', type=probability, default=0.5)
    g.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    g.add_argument('--mixup-off-epoch', default=0, type=non_negative_int)
    g.add_argument('--smoothing', type=drop_rate, default=0.1)
    g.add_argument('--train-interpolation', default='random', choices=('', 'random') + INTERPOLATIONS)
    g.add_argument('--drop', type=drop_rate, default=0.0, metavar='PCT',
                   help='timm 1.x drop_rate (dropout before the classifier); for MLP-Mixer-family models without '
                        '--proj-drop it is the upstream (timm 0.4/0.5) block dropout, see the log')
    g.add_argument('--proj-drop', type=drop_rate, default=None, metavar='PCT', help='dropout inside the blocks (proj_drop_rate)')
    g.add_argument('--drop-path', type=drop_rate, default=None, metavar='PCT')
    g.add_argument('--drop-connect', type=drop_rate, default=None, metavar='PCT', help='old name of --drop-path')
    g.add_argument('--drop-block', type=drop_rate, default=None, metavar='PCT')
    g.add_argument('--head-drop', type=drop_rate, default=None, metavar='PCT', help='NOAH value dropout (head_drop_rate)')
    g = p.add_argument_group('BatchNorm')
    g.add_argument('--bn-momentum', type=probability, default=None)
    g.add_argument('--bn-eps', type=positive_float, default=None)
    g.add_argument('--sync-bn', action='store_true', default=False, help='SyncBatchNorm (CUDA only)')
    g.add_argument('--dist-bn', default='reduce', choices=('broadcast', 'reduce', ''), help='"broadcast", "reduce" or "" (BN stats at epoch end)')
    g.add_argument('--split-bn', action='store_true', default=False, help='not supported')
    g = p.add_argument_group('EMA')
    g.add_argument('--model-ema', action='store_true', default=False)
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    g.add_argument('--model-ema-decay', type=probability, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true', default=False)
    g = p.add_argument_group('Miscellaneous')
    g.add_argument('--seed', type=seed_int, default=42)
    g.add_argument('--worker-seeding', default='all', choices=('all', 'part'))
    g.add_argument('--log-interval', type=positive_int, default=50, metavar='N')
    g.add_argument('--recovery-interval', type=non_negative_int, default=0, metavar='N', help='recovery checkpoint every N steps')
    g.add_argument('--checkpoint-hist', type=positive_int, default=10, metavar='N')
    g.add_argument('-j', '--workers', type=non_negative_int, default=default_loader_workers(), metavar='N',
                   help='data-loader processes per training process; the default fits the machine: '
                        'min(4, its share of the cores - 1)')
    g.add_argument('--save-images', action='store_true', default=False, help='not supported')
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--no-prefetcher', action='store_true', default=False)
    g.add_argument('--output', default='', metavar='DIR', help='default: ./output/train')
    g.add_argument('--experiment', default='', metavar='NAME')
    g.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'])
    g.add_argument('--tta', type=non_negative_int, default=0, help='not supported in training (must be 0)')
    g.add_argument('--use-multi-epochs-loader', action='store_true', default=False)
    g.add_argument('--log-wandb', action='store_true', default=False, help='not supported')
    g.add_argument('--torchscript', action='store_true', default=False, help='not supported')
    g.add_argument('--save-hf', default='', metavar='DIR',
                   help='at the end, write the best checkpoint as a timm local-dir: folder (config.json + safetensors)')
    return p
