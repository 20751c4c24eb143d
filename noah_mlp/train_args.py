"""Command-line flags of ``noah-train`` / ``train.py``: timm train.py's names, grouped as timm groups them.

Kept apart from the training logic (`noah_mlp.train`) so the flag set can be read, tested against
timm's and documented on its own. Every flag of timm 1.0's train.py exists here: it either does
what it does in timm, or it is listed in `REFUSED` with the reason, and giving it a value other
than its default stops the run with that reason (so a timm YAML config that merely carries the
default still loads).
"""
import argparse
import os
import sys
from typing import Dict, List

from .cli_common import add_precision_args, default_loader_workers
from .config import (
    INTERPOLATIONS, SCHEDULERS, ArgumentParser, HelpFormatter, KeyValueAction, area_fraction, augment_policy,
    check_image_args, compile_backend, device_name, drop_rate, non_negative_float, non_negative_int, positive_float,
    positive_int, probability, seed_int)
from .errors import UserError

__all__ = ['build_parser', 'check_train_args', 'REFUSED', 'refused_in_use', 'prog_name', 'add_dataset_source_args']

# dest -> why this script does not do what timm's flag does
REFUSED: Dict[str, str] = {
    'fuser': 'TorchScript fusers are obsolete in PyTorch 2; use --torchcompile',
    'torchscript': 'TorchScript training was dropped in favour of torch.compile; use --torchcompile',
    'aug_splits': 'augmentation splits (AugMix-style clean/augmented views) are not implemented here',
    'jsd_loss': 'needs --aug-splits, which is not implemented here',
    'split_bn': 'needs --aug-splits, which is not implemented here; MLP-Mixer models have no BatchNorm anyway',
    'tta': 'test-time augmentation belongs to evaluation, not training',
    'save_images': 'debug image dumps are not implemented; look at the data with the attention figures instead',
    'naflex_loader': 'NaFlex variable-resolution loading needs a NaFlex ViT; MLP-Mixer token mixing fixes the token count',
    'naflex_train_seq_lens': 'only with --naflex-loader (not supported)',
    'naflex_max_seq_len': 'only with --naflex-loader (not supported)',
    'naflex_patch_sizes': 'only with --naflex-loader (not supported)',
    'naflex_patch_size_probs': 'only with --naflex-loader (not supported)',
    'naflex_loss_scale': 'only with --naflex-loader (not supported)',
    'kd_model_name': 'knowledge distillation (timm.task) is not wired into this script',
    'kd_distill_type': 'only with --kd-model-name (not supported)',
    'kd_loss_type': 'only with --kd-model-name (not supported)',
    'distill_loss_weight': 'only with --kd-model-name (not supported)',
    'task_loss_weight': 'only with --kd-model-name (not supported)',
    'kd_temperature': 'only with --kd-model-name (not supported)',
    'kd_student_feature_dim': 'only with --kd-model-name (not supported)',
    'kd_teacher_feature_dim': 'only with --kd-model-name (not supported)',
    'kd_token_distill_type': 'only with --kd-model-name (not supported)',
}


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


def prog_name(script: str) -> str:
    """The name the tool was started as (noah-train, train.py), for usage lines and messages."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ''
    if not name or name in ('__main__.py', '-c', '-m', 'pytest', 'python'):
        return script
    return name


def refused_in_use(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   refused: Dict[str, str]) -> List[str]:
    """`--flag: reason` for every refused flag whose value differs from its default."""
    out = []
    for action in parser._actions:
        if action.dest in refused and getattr(args, action.dest, action.default) != action.default:
            out.append(f'{action.option_strings[-1]} is not supported: {refused[action.dest]}.')
    return out


def add_dataset_source_args(group) -> None:
    """How images are read (train.py and validate.py alike): download, class map, image mode, dataset keys."""
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='let torch/ and tfds/ datasets download themselves')
    group.add_argument('--class-map', default='', metavar='FILE', help='file mapping class names to indices')
    group.add_argument('--input-img-mode', default=None, metavar='MODE',
                       help='PIL mode (default: L for 1 channel, else RGB)')
    group.add_argument('--input-key', default=None, metavar='KEY', help='image field of hfds/hfids/wds datasets')
    group.add_argument('--target-key', default=None, metavar='KEY', help='label field of hfds/hfids/wds datasets')
    group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                       help="let a Hugging Face dataset run its repository's loading code")


def _refused(group, *names: str, dest: str, **kwargs) -> None:
    """A timm flag kept so configs carrying its default load; its help says why it is refused."""
    group.add_argument(*names, dest=dest, help=f'not supported: {REFUSED[dest]}', **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog_name('train.py'),
        description='Train timm / NOAH image classifiers with timm train.py flags. '
                    'Every timm 1.0 flag is accepted; the few this script refuses say why.',
        formatter_class=HelpFormatter, usage='%(prog)s [DIR] --model NAME [-c FILE] [options]',
        checks=[check_image_args, check_train_args])
    p.add_argument('-c', '--config', default='', metavar='FILE',
                   help='YAML file of defaults (keys: flag names with _); the command line overrides it')
    p.add_argument('data', nargs='?', metavar='DIR', help='dataset root (ImageFolder: train/ and val/ or validation/)')

    g = p.add_argument_group('Dataset parameters')
    g.add_argument('--data-dir', metavar='DIR', default=None, help='dataset root (instead of the positional DIR)')
    g.add_argument('--dataset', metavar='NAME', default='', help='timm dataset spec, e.g. torch/cifar10 (empty: ImageFolder)')
    g.add_argument('--train-split', metavar='NAME', default='train', help='training split (folder) name')
    g.add_argument('--val-split', metavar='NAME', default='validation',
                   help='validation split name (val/ and validation/ both match)')
    g.add_argument('--train-num-samples', type=positive_int, default=None, metavar='N',
                   help='images in the training split, for iterable (wds/tfds/hfids) datasets')
    g.add_argument('--val-num-samples', type=positive_int, default=None, metavar='N',
                   help='images in the validation split, for iterable (wds/tfds/hfids) datasets')
    add_dataset_source_args(g)

    g = p.add_argument_group('Model parameters')
    g.add_argument('--model', default='', metavar='NAME', help='timm model name, e.g. noah_gmlp_ti16_224')
    g.add_argument('--pretrained', action='store_true', default=False,
                   help="start from the model's pretrained weights (its pretrained_cfg)")
    g.add_argument('--pretrained-path', default=None, metavar='FILE',
                   help="load FILE as the model's pretrained weights, head adapted (implies --pretrained)")
    g.add_argument('--noah-head', action='store_true', default=False,
                   help='replace the classifier of any timm --model by a NOAH head (noah_mlp.add_noah_head)')
    g.add_argument('--initial-checkpoint', default='', metavar='PATH',
                   help='load these weights before training (EMA weights when the file has them)')
    g.add_argument('--resume', default='', metavar='PATH',
                   help='continue a run: model, optimizer, EMA, AMP scaler and epoch from this checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='with --resume, start the optimizer afresh')
    g.add_argument('--num-classes', type=positive_int, default=None, metavar='N', help='classes (default: those of the dataset)')
    g.add_argument('--gp', default=None, metavar='POOL', help="global pool type (timm models that have one)")
    g.add_argument('--img-size', type=positive_int, default=None, metavar='N', help='train and build the model at N px')
    g.add_argument('--in-chans', type=positive_int, default=None, metavar='N', help='input channels (default 3)')
    g.add_argument('--input-size', default=None, nargs=3, type=positive_int, metavar='N',
                   help='channels, height, width (e.g. 3 224 224); overrides --img-size')
    g.add_argument('--crop-pct', default=None, type=positive_float, metavar='PCT', help='evaluation centre-crop ratio')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalisation mean per channel')
    g.add_argument('--std', type=positive_float, nargs='+', default=None, metavar='STD', help='normalisation std per channel')
    g.add_argument('--interpolation', choices=('',) + INTERPOLATIONS, default='', type=str, metavar='NAME',
                   help="resize interpolation (default: the model's)")
    g.add_argument('-b', '--batch-size', type=positive_int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=positive_int, default=None, metavar='N',
                   help='evaluation batch size per process (default: --batch-size)')
    g.add_argument('--channels-last', action='store_true', default=False, help='channels_last memory layout')
    g.add_argument('--grad-accum-steps', type=positive_int, default=1, metavar='N',
                   help='batches whose gradients are summed before each optimizer step')
    g.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help='recompute block activations in backward (less memory, more time)')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValueAction, metavar='KEY=VALUE',
                   help='extra model arguments, e.g. noah_head_num=8 key_ratio=0.25 num_blocks=2')
    g.add_argument('--head-init-scale', type=float, default=None, metavar='S',
                   help='multiply the fresh head by S; for a NOAH head: its value projection (docs/head.md)')
    g.add_argument('--head-init-bias', type=float, default=None, metavar='B',
                   help='set the fresh head so every logit starts at bias B (NOAH: B/N per group, docs/head.md)')
    g.add_argument('--torchcompile', nargs='?', type=compile_backend, default=None, const='inductor', metavar='BACKEND',
                   help='torch.compile the model with this backend (inductor when given alone)')
    g.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE',
                   help='torch.compile mode, e.g. max-autotune or reduce-overhead')
    _refused(g, '--fuser', dest='fuser', default='', metavar='NAME')
    _refused(g, '--torchscript', dest='torchscript', action='store_true', default=False)

    g = p.add_argument_group('Device parameters')
    g.add_argument('--device', type=device_name, default='auto', help='auto: CUDA when present, else CPU')
    g.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    add_precision_args(g)
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='no DDP buffer broadcast')
    g.add_argument('--synchronize-step', action='store_true', default=False,
                   help='wait for the device at the end of every step (accurate step times)')
    g.add_argument('--local-rank', '--local_rank', default=0, type=non_negative_int, metavar='N',
                   help='set by the old torch.distributed.launch; ignored (the rank comes from the environment)')

    g = p.add_argument_group('Optimizer parameters')
    g.add_argument('--opt', default='sgd', metavar='NAME', help='timm optimizer name, e.g. adamw, lamb, sgd')
    g.add_argument('--opt-eps', default=None, type=positive_float, metavar='EPS', help="optimizer epsilon (default: the optimizer's)")
    g.add_argument('--opt-betas', default=None, type=drop_rate, nargs='+', metavar='BETA',
                   help="optimizer betas (default: the optimizer's)")
    g.add_argument('--momentum', type=non_negative_float, default=0.9, metavar='M', help='optimizer momentum')
    g.add_argument('--weight-decay', type=non_negative_float, default=2e-5, metavar='WD', help='weight decay')
    g.add_argument('--clip-grad', type=positive_float, default=None, metavar='NORM', help='gradient clipping threshold (off when not given)')
    g.add_argument('--clip-mode', type=str, default='norm', choices=['norm', 'value', 'agc'], help='gradient clipping mode')
    g.add_argument('--layer-decay', type=positive_float, default=None, metavar='RATE', help='layer-wise learning-rate decay')
    g.add_argument('--layer-decay-min-scale', type=non_negative_float, default=None, metavar='S',
                   help='lower clamp of the layer-wise learning-rate scale')
    g.add_argument('--layer-decay-no-opt-scale', type=non_negative_float, default=None, metavar='S',
                   help='layers whose layer-decay scale falls below S are frozen')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=KeyValueAction, metavar='KEY=VALUE',
                   help='extra optimizer arguments')

    g = p.add_argument_group('Learning rate schedule parameters')
    g.add_argument('--sched', choices=SCHEDULERS, type=str, default='cosine', metavar='NAME',
                   help='timm scheduler: cosine, tanh, step, multistep, plateau, poly or none')
    g.add_argument('--sched-on-updates', action='store_true', default=False,
                   help='step the schedule every optimizer update instead of every epoch')
    g.add_argument('--lr', type=non_negative_float, default=None, metavar='LR',
                   help='absolute learning rate (default: --lr-base scaled by the global batch)')
    g.add_argument('--lr-base', type=non_negative_float, default=0.1, metavar='LR',
                   help='learning rate for a global batch of --lr-base-size')
    g.add_argument('--lr-base-size', type=positive_int, default=256, metavar='N', help='global batch that --lr-base refers to')
    g.add_argument('--lr-base-scale', choices=('', 'linear', 'sqrt'), type=str, default='', metavar='SCALE',
                   help='linear or sqrt scaling of --lr-base (empty: sqrt for Ada*/LAMB, else linear)')
    g.add_argument('--lr-noise', type=non_negative_float, nargs='+', default=None, metavar='PCT',
                   help='epoch fraction(s) between which the learning rate is noised')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PCT', help='learning-rate noise limit')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STD', help='learning-rate noise std')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='cycle length multiplier')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='learning-rate decay per cycle')
    g.add_argument('--lr-cycle-limit', type=positive_int, default=1, metavar='N', help='number of cycles')
    g.add_argument('--lr-k-decay', type=float, default=1.0, metavar='K', help='k-decay of cosine / poly schedules')
    g.add_argument('--warmup-lr', type=non_negative_float, default=1e-5, metavar='LR', help='learning rate at the start of warmup')
    g.add_argument('--min-lr', type=non_negative_float, default=0, metavar='LR', help='learning-rate floor of the schedule')
    g.add_argument('--epochs', type=positive_int, default=300, metavar='N', help='epochs to train')
    g.add_argument('--epoch-repeats', type=non_negative_float, default=0., metavar='N',
                   help='passes over the dataset per epoch (0: one)')
    g.add_argument('--start-epoch', default=None, type=non_negative_int, metavar='N', help='force the first epoch number')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=non_negative_int, nargs='+', metavar='EPOCH',
                   help='epochs at which multistep decays the learning rate')
    g.add_argument('--decay-epochs', type=positive_float, default=90, metavar='N', help='step schedule: epochs between decays')
    g.add_argument('--warmup-epochs', type=non_negative_int, default=5, metavar='N', help='epochs of linear warmup')
    g.add_argument('--warmup-prefix', action='store_true', default=False,
                   help='warmup comes before the schedule instead of overlapping it')
    g.add_argument('--cooldown-epochs', type=non_negative_int, default=0, metavar='N', help='epochs at --min-lr after the schedule')
    g.add_argument('--patience-epochs', type=non_negative_int, default=10, metavar='N', help='plateau schedule patience')
    g.add_argument('--decay-rate', '--dr', type=non_negative_float, default=0.1, metavar='RATE', help='step / plateau decay factor')

    g = p.add_argument_group('Augmentation and regularization parameters')
    g.add_argument('--no-aug', action='store_true', default=False, help='no training augmentation at all')
    g.add_argument('--train-crop-mode', choices=('rrc', 'rkrc', 'rkrr'), type=str, default=None, metavar='MODE', help='training crop mode (timm)')
    g.add_argument('--scale', type=area_fraction, nargs='+', default=[0.08, 1.0], metavar='PCT', help='random-resized-crop area range')
    g.add_argument('--ratio', type=positive_float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='random-resized-crop aspect ratio range')
    g.add_argument('--hflip', type=probability, default=0.5, metavar='P', help='horizontal flip probability')
    g.add_argument('--vflip', type=probability, default=0., metavar='P', help='vertical flip probability')
    g.add_argument('--color-jitter', type=non_negative_float, default=0.4, metavar='PCT', help='colour jitter strength')
    g.add_argument('--color-jitter-prob', type=probability, default=None, metavar='P', help='probability of colour jitter')
    g.add_argument('--grayscale-prob', type=probability, default=None, metavar='P', help='probability of grayscale')
    g.add_argument('--gaussian-blur-prob', type=probability, default=None, metavar='P', help='probability of Gaussian blur')
    g.add_argument('--aa', type=augment_policy, default=None, metavar='POLICY', help='auto augment, e.g. rand-m6-n3-mstd1.0-inc1')
    g.add_argument('--aug-repeats', type=non_negative_int, default=0, metavar='N', help='repeated augmentation count (distributed)')
    _refused(g, '--aug-splits', dest='aug_splits', type=non_negative_int, default=0, metavar='N')
    _refused(g, '--jsd-loss', dest='jsd_loss', action='store_true', default=False)
    g.add_argument('--bce-loss', action='store_true', default=False, help='binary cross-entropy loss')
    g.add_argument('--bce-sum', action='store_true', default=False, help='with --bce-loss: sum over classes')
    g.add_argument('--bce-target-thresh', type=probability, default=None, metavar='T',
                   help='with --bce-loss: binarise soft targets at T')
    g.add_argument('--bce-pos-weight', type=positive_float, default=None, metavar='W', help='with --bce-loss: positive weight')
    g.add_argument('--reprob', type=probability, default=0., metavar='P', help='random erasing probability')
    g.add_argument('--remode', choices=('const', 'rand', 'pixel'), type=str, default='pixel', metavar='MODE', help='random erasing fill: pixel, rand or const')
    g.add_argument('--recount', type=positive_int, default=1, metavar='N', help='random erasing count')
    g.add_argument('--resplit', action='store_true', default=False, help='no random erasing on the first split')
    g.add_argument('--mixup', type=non_negative_float, default=0.0, metavar='ALPHA', help='mixup alpha (on when > 0)')
    g.add_argument('--cutmix', type=non_negative_float, default=0.0, metavar='ALPHA', help='cutmix alpha (on when > 0)')
    g.add_argument('--cutmix-minmax', type=area_fraction, nargs='+', default=None, metavar='R',
                   help='cutmix box ratio range (turns cutmix on, overrides alpha)')
    g.add_argument('--mixup-prob', type=probability, default=1.0, metavar='P', help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=probability, default=0.5, metavar='P',
                   help='probability of cutmix instead of mixup when both are on')
    g.add_argument('--mixup-mode', choices=('batch', 'pair', 'elem'), type=str, default='batch', metavar='MODE', help='mixup per batch, pair or elem')
    g.add_argument('--mixup-off-epoch', default=0, type=non_negative_int, metavar='N', help='turn mixup off from this epoch (0: never)')
    g.add_argument('--smoothing', type=drop_rate, default=0.1, metavar='EPS', help='label smoothing')
    g.add_argument('--train-interpolation', choices=('', 'random') + INTERPOLATIONS, type=str, default='random', metavar='NAME', help='training resize interpolation')
    g.add_argument('--drop', type=drop_rate, default=0.0, metavar='PCT',
                   help='timm 1.x drop_rate (dropout before the classifier); for MLP-Mixer-family models without '
                        '--proj-drop it is the upstream (timm 0.4/0.5) block dropout, see the log')
    g.add_argument('--proj-drop', type=drop_rate, default=None, metavar='PCT', help='dropout inside the blocks (proj_drop_rate)')
    g.add_argument('--drop-path', type=drop_rate, default=None, metavar='PCT', help='stochastic depth rate')
    g.add_argument('--drop-connect', type=drop_rate, default=None, metavar='PCT', help='old name of --drop-path')
    g.add_argument('--drop-block', type=drop_rate, default=None, metavar='PCT', help='DropBlock rate (CNNs)')
    g.add_argument('--head-drop', type=drop_rate, default=None, metavar='PCT', help='NOAH value dropout (head_drop_rate)')

    g = p.add_argument_group('Batch norm parameters')
    g.add_argument('--bn-momentum', type=probability, default=None, metavar='M', help='BatchNorm momentum override')
    g.add_argument('--bn-eps', type=positive_float, default=None, metavar='EPS', help='BatchNorm epsilon override')
    g.add_argument('--sync-bn', action='store_true', default=False, help='SyncBatchNorm (distributed CUDA only)')
    g.add_argument('--dist-bn', choices=('broadcast', 'reduce', ''), type=str, default='reduce', metavar='MODE',
                   help='BatchNorm statistics across processes at epoch end: broadcast, reduce or ""')
    _refused(g, '--split-bn', dest='split_bn', action='store_true', default=False)

    g = p.add_argument_group('Model exponential moving average parameters')
    g.add_argument('--model-ema', action='store_true', default=False,
                   help='keep an EMA of the weights; it is evaluated and ranks the checkpoints')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='keep the EMA on the CPU')
    g.add_argument('--model-ema-decay', type=probability, default=0.9998, metavar='D', help='EMA decay per update')
    g.add_argument('--model-ema-warmup', action='store_true', default=False, help='ramp the EMA decay up at the start')

    g = p.add_argument_group('Miscellaneous parameters')
    g.add_argument('--seed', type=seed_int, default=42, metavar='S', help='random seed (each process adds its rank)')
    g.add_argument('--worker-seeding', choices=('all', 'part'), type=str, default='all', metavar='MODE', help='data-loader worker seeding (timm)')
    g.add_argument('--log-interval', type=positive_int, default=50, metavar='N', help='log every N steps')
    g.add_argument('--val-interval', type=positive_int, default=1, metavar='N',
                   help='evaluate and write checkpoints every N epochs (and after the last)')
    g.add_argument('--recovery-interval', type=non_negative_int, default=0, metavar='N', help='recovery checkpoint every N steps (0: off)')
    g.add_argument('--checkpoint-hist', type=positive_int, default=10, metavar='N', help='best checkpoints to keep')
    g.add_argument('-j', '--workers', type=non_negative_int, default=default_loader_workers(), metavar='N',
                   help='data-loader processes per training process; the default fits the machine: '
                        'min(4, its share of the cores - 1)')
    g.add_argument('--pin-mem', action='store_true', default=False, help='pin host memory in the data loader')
    g.add_argument('--no-prefetcher', action='store_true', default=False, help="no timm prefetcher (normalise on the host)")
    g.add_argument('--output', default='', metavar='DIR', help='output root (default: ./output/train)')
    g.add_argument('--experiment', default='', metavar='NAME', help='run folder name under --output (default: date-model-size)')
    g.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'], help='metric that picks the best checkpoint')
    g.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                   help='keep loader workers across epochs')
    g.add_argument('--save-hf', default='', metavar='DIR',
                   help='at the end, write the best checkpoint as a timm local-dir: folder (config.json + safetensors)')
    _refused(g, '--tta', dest='tta', type=non_negative_int, default=0, metavar='N')
    _refused(g, '--save-images', dest='save_images', action='store_true', default=False)

    g = p.add_argument_group('Weights & Biases (pip install "noah-mlp[wandb]")')
    g.add_argument('--log-wandb', action='store_true', default=False,
                   help='log the per-epoch metrics to W&B (rank 0; WANDB_MODE=offline works without network)')
    g.add_argument('--wandb-project', default=None, metavar='NAME', help='W&B project (default: W&B\'s)')
    g.add_argument('--wandb-tags', default=[], nargs='+', metavar='TAG', help='W&B run tags')
    g.add_argument('--wandb-resume-id', default='', metavar='ID', help='continue this W&B run (with --resume)')

    g = p.add_argument_group('timm flags for other model families (refused; each says why)')
    _refused(g, '--naflex-loader', dest='naflex_loader', action='store_true', default=False)
    _refused(g, '--naflex-train-seq-lens', dest='naflex_train_seq_lens', type=int, nargs='+',
             default=[128, 256, 576, 784, 1024], metavar='N')
    _refused(g, '--naflex-max-seq-len', dest='naflex_max_seq_len', type=int, default=576, metavar='N')
    _refused(g, '--naflex-patch-sizes', dest='naflex_patch_sizes', type=int, nargs='+', default=None, metavar='N')
    _refused(g, '--naflex-patch-size-probs', dest='naflex_patch_size_probs', type=float, nargs='+', default=None,
             metavar='P')
    _refused(g, '--naflex-loss-scale', dest='naflex_loss_scale', default='linear', metavar='MODE')
    _refused(g, '--kd-model-name', dest='kd_model_name', default=None, metavar='NAME')
    _refused(g, '--kd-distill-type', dest='kd_distill_type', default='logit', metavar='TYPE')
    _refused(g, '--kd-loss-type', dest='kd_loss_type', default='kl', metavar='TYPE')
    _refused(g, '--distill-loss-weight', dest='distill_loss_weight', type=float, default=None, metavar='W')
    _refused(g, '--task-loss-weight', dest='task_loss_weight', type=float, default=None, metavar='W')
    _refused(g, '--kd-temperature', dest='kd_temperature', type=float, default=4.0, metavar='T')
    _refused(g, '--kd-student-feature-dim', dest='kd_student_feature_dim', type=int, default=None, metavar='N')
    _refused(g, '--kd-teacher-feature-dim', dest='kd_teacher_feature_dim', type=int, default=None, metavar='N')
    _refused(g, '--kd-token-distill-type', dest='kd_token_distill_type', default='soft', metavar='TYPE')
    return p
