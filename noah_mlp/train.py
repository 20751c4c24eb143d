"""Train timm / NOAH models with timm's library pieces: ``noah-train`` / ``python train.py``.

Flags and YAML keys carry timm train.py's names. Single process::

    python train.py DATA --model noah_gmlp_ti16_224 --config configs/default_noah.yaml

Several processes (torchrun's environment; NCCL on CUDA, gloo on CPU)::

    bash distributed_train.sh 8 DATA --config configs/default_noah.yaml --model noah_gmlp_ti16_224

Outputs go to ``{output}/{experiment}/``: last.pth.tar, model_best.pth.tar, checkpoint-N.pth.tar,
summary.csv, training_curves.png (with matplotlib) and args.yaml, every file written atomically.
SIGTERM / SIGINT finish the current step, write a recovery checkpoint and exit non-zero with the
command that resumes the run.
"""
import argparse
import contextlib
import csv
import io
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections import OrderedDict
from datetime import datetime
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import FastCollateMixup, Mixup, create_loader
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    ModelEmaV3, NativeScaler, dispatch_clip_grad, distribute_bn, random_seed, unwrap_model)
from timm.utils.distributed import init_distributed_device_so

from .checkpoint import AtomicCheckpointSaver, atomic_write_text, check_compatible, extract_state_dict, safe_load
from .cli_common import (
    amp_autocast, create_model_checked, is_mixer_family, load_initial_weights, prepare_runtime,
    resolve_data_config_checked, resolve_device, setup_logging)
from .config import args_to_yaml, parse_args_with_config, plain_namespace
from .datasets import build_dataset, class_names
from .errors import UserError, cli_main
from .head import NoahHead
from .launch import launch_command, stop_when_launcher_dies
from .plot import plot_after_training
from .rng import capture_rng_state, restore_rng_state
from .run_folder import RunFolderLock, check_writable_folder, claim_run_folder
from .train_args import REFUSED, build_parser, refused_in_use

__all__ = ['build_parser', 'main', 'train']

_logger = logging.getLogger('noah_mlp.train')

SUMMARY_FIELDS = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']


# --------------------------------------------------------------------------------------------- signals
class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and exits. The same signal again kills."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._first = 0.
        self._old = {}
        self._announced = False

    def install(self) -> None:
        import threading
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum != self.signum or time.monotonic() - self._first < 3.0:
                # Ctrl-C reaches the workers both from the terminal and forwarded by torchrun, which may
                # follow with SIGTERM: keep stopping cleanly. A deliberate repeat kills at once.
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self._first = time.monotonic()
        if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
            self.announce(signum)
        # several processes: rank 0 announces the stop once the step's all-reduce has seen it
        # (torchrun also sends SIGTERM when a peer fails; that run ends with the peer's error instead)

    def announce(self, signum: Optional[int]) -> None:
        """Say once, on rank 0, that the run is stopping."""
        if self._announced or os.environ.get('RANK', '0') != '0':
            return
        self._announced = True
        name = signal.Signals(signum or signal.SIGTERM).name
        print(f'{name} received: finishing the current step, then writing a recovery checkpoint '
              f'(send it again to stop at once).', file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init_ignoring_stop_signals(orig_init, worker_id: int) -> None:
    # Ctrl-C, Slurm preemption, scancel and systemd signal the whole process group: loader workers keep
    # serving batches while the main process finishes its step and writes the recovery checkpoint; the
    # main process shuts them down as it exits (and they exit by themselves if it dies). The signals were
    # blocked since the fork (see `_protect_workers`), so none slipped in before this point.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if orig_init is not None:
        orig_init(worker_id)


def _protect_workers(loader) -> None:
    """Loader workers ignore SIGINT / SIGTERM. They are forked with both signals blocked (torch installs a
    dying SIGTERM handler in each worker before `worker_init_fn` runs), and ignore them from then on."""
    dl = getattr(loader, 'loader', loader)
    if getattr(dl, 'num_workers', 0) <= 0:
        return
    dl.worker_init_fn = partial(_worker_init_ignoring_stop_signals, dl.worker_init_fn)
    start_workers = dl._get_iterator  # where torch's DataLoader forks its workers

    def _start_workers_with_stop_signals_blocked():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return start_workers()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending signal reaches this process now
    dl._get_iterator = _start_workers_with_stop_signals_blocked


def _shut_down_workers(loader) -> None:
    """Stop a loader's persistent workers now. They ignore SIGTERM, so multiprocessing's exit hook (which
    terminates daemon children with SIGTERM, then joins them) must find none left."""
    dl = getattr(loader, 'loader', loader)
    iterator = getattr(dl, '_iterator', None)
    if iterator is not None and hasattr(iterator, '_shutdown_workers'):
        iterator._shutdown_workers()
        dl._iterator = None


class Stopped(Exception):
    def __init__(self, signum: int, epoch: int, step: int) -> None:
        super().__init__(signum)
        self.signum, self.epoch, self.step = signum, epoch, step


# --------------------------------------------------------------------------------------------- helpers
def _check_args(args: argparse.Namespace) -> None:
    for message in refused_in_use(build_parser(), args, REFUSED):
        raise UserError(message)


def _model_args(args: argparse.Namespace, notes: List[str]) -> Dict[str, Any]:
    mixer = is_mixer_family(args.model)
    kwargs: Dict[str, Any] = dict(
        pretrained=args.pretrained,
        num_classes=args.num_classes,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        drop_block_rate=args.drop_block,
        in_chans=args.in_chans,
    )
    drop_path = args.drop_path if args.drop_path is not None else args.drop_connect
    if args.drop_connect is not None and args.drop_path is None:
        notes.append(f'--drop-connect {args.drop_connect} used as drop_path_rate (its timm 1.x name is --drop-path).')
    kwargs['drop_path_rate'] = drop_path
    if mixer and args.proj_drop is None and args.drop:
        # Upstream NOAH (timm 0.4/0.5): MLP-Mixer's drop_rate was dropout inside the MLP blocks; timm 1.x calls
        # that proj_drop_rate and uses drop_rate before the classifier instead.
        kwargs['proj_drop_rate'] = args.drop
        kwargs['drop_rate'] = 0.
        notes.append(
            f'--drop/drop {args.drop} applied as block dropout (proj_drop_rate), its meaning for MLP-Mixer-family '
            f'models in timm 0.4/0.5 and upstream NOAH configs; timm 1.x would apply it before the classifier. '
            f'Set --proj-drop explicitly to give --drop the timm 1.x meaning.')
    else:
        kwargs['drop_rate'] = args.drop
        kwargs['proj_drop_rate'] = args.proj_drop
    if args.head_drop is not None:
        if not (args.model.startswith('noah_') or args.noah_head):
            raise UserError(f'--head-drop (NOAH value dropout) applies to noah_* models (or --noah-head) only, '
                            f'not {args.model}.')
        kwargs['head_drop_rate'] = args.head_drop
    img_size = args.input_size[-1] if args.input_size else args.img_size
    if img_size is not None:
        kwargs['img_size'] = img_size
    kwargs.update(args.model_kwargs or {})
    return kwargs


def _lr(args: argparse.Namespace, world_size: int) -> float:
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    if scale == 'sqrt':
        ratio = ratio ** 0.5
    return args.lr_base * ratio


def _init_head(model: nn.Module, scale: Optional[float], bias: Optional[float]) -> None:
    """--head-init-scale / --head-init-bias: timm's meaning for a linear head, NoahHead.init_scaled for NOAH's."""
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if isinstance(head, NoahHead):
        head.init_scaled(scale, bias)
    elif isinstance(head, nn.Linear) and head.bias is not None:
        with torch.no_grad():
            if scale is not None:
                head.weight.mul_(scale)
                head.bias.mul_(scale)
            if bias is not None:
                head.bias.fill_(bias)
    else:
        raise UserError(f'--head-init-scale / --head-init-bias apply to a NOAH or linear classifier head, '
                        f'not to {type(head).__name__}.')
    _logger.info(f'Head initialised: weights x {scale if scale is not None else 1}'
                 f'{f", every logit starts at {bias}" if bias is not None else ""}.')


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError('--log-wandb needs the wandb package: pip install "noah-mlp[wandb]" (or pip install wandb).') \
            from None
    return wandb


def _start_wandb(run: 'TrainRun') -> None:
    """--log-wandb (rank 0): a W&B run named after the run folder, with the training flags as its config."""
    args = run.args
    if args.wandb_resume_id and not args.resume:
        raise UserError('--wandb-resume-id continues a W&B run: give it with --resume, which continues the training.')
    wandb = _import_wandb()
    run.wandb_run = wandb.init(
        project=args.wandb_project, name=os.path.basename(run.output_dir), config=vars(plain_namespace(args)),
        tags=args.wandb_tags or None, id=args.wandb_resume_id or None,
        resume='must' if args.wandb_resume_id else None, dir=run.output_dir)
    _logger.info(f'W&B run {run.wandb_run.id} (project {run.wandb_run.project}).')


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h:d}:{m:02d}:{s:02d}'


def _all_reduce_sum(t: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _write_summary(path: str, rows: List[Dict[str, Any]], fields: List[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(buf.getvalue(), path)


def _read_summary(path: str, before_epoch: int) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return [r for r in csv.DictReader(f) if r.get('epoch', '').isdigit() and int(r['epoch']) < before_epoch]


# --------------------------------------------------------------------------------------------- the run's state
@dataclass
class TrainRun:
    """What one training run carries from stage to stage; each stage fills in its part.

    The stages, in order (``_train``): set up the run (arguments, device, processes), build the
    datasets, build the model, build the loaders (with mixup and the loss), build the optimisation
    (optimizer, resume, EMA, scheduler), prepare the output folder, run the epochs, finish.
    """
    argv: List[str]
    stop: StopRequest
    args: argparse.Namespace
    device: torch.device
    distributed: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # data
    dataset_train: Any = None
    dataset_eval: Any = None
    labels: Optional[List[str]] = None
    loader_train: Any = None
    loader_eval: Any = None
    mixup_fn: Optional[Mixup] = None
    train_loss_fn: Optional[nn.Module] = None
    # model
    model: Optional[nn.Module] = None  # the bare model: what checkpoints and evaluation see
    train_model: Optional[nn.Module] = None  # the model as trained: wrapped by DDP / torch.compile
    model_ema: Optional[ModelEmaV3] = None
    data_config: Dict[str, Any] = field(default_factory=dict)
    autocast: Callable = contextlib.nullcontext
    loss_scaler: Optional[NativeScaler] = None
    model_dtype: Optional[torch.dtype] = None  # --model-dtype: weights and inputs in this dtype (no AMP)
    # optimisation
    optimizer: Optional[torch.optim.Optimizer] = None
    lr_scheduler: Any = None
    num_epochs: int = 0
    updates_per_epoch: int = 0
    start_epoch: int = 0
    num_updates: int = 0
    resume_ckpt: Optional[Dict[str, Any]] = None
    # random state of every process (index: rank) at the start of the current / the next epoch
    epoch_start_rng: Optional[List[Dict[str, Any]]] = None
    next_epoch_rng: Optional[List[Dict[str, Any]]] = None
    # output (rank 0 only)
    output_dir: str = ''
    lock: Optional[RunFolderLock] = None
    saver: Optional[AtomicCheckpointSaver] = None
    summary_rows: List[Dict[str, Any]] = field(default_factory=list)
    summary_fields: List[str] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    wandb_run: Any = None  # --log-wandb (rank 0)

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def summary_path(self) -> str:
        return os.path.join(self.output_dir, 'summary.csv')


# --------------------------------------------------------------------------------------------- loops
def train_one_epoch(run: TrainRun, epoch: int) -> Dict[str, float]:
    """One epoch of training steps; advances ``run.num_updates``. Raises Stopped after SIGTERM / SIGINT."""
    args, model, loader = run.args, run.train_model, run.loader_train
    model.train()
    accum = args.grad_accum_steps
    total = len(loader)
    last_accum = total - total % accum if total % accum else total - accum
    loss_sum, loss_count = 0., 0
    meter = _StepMeter(time.time())
    run.optimizer.zero_grad()
    for step, (input, target) in enumerate(loader):
        last = step == total - 1
        need_update = last or (step + 1) % accum == 0
        update_accum = (total - last_accum) if step >= last_accum else accum
        if args.no_prefetcher:
            input, target = input.to(run.device, dtype=run.model_dtype), target.to(run.device)
            if run.mixup_fn is not None:
                input, target = run.mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        # without an update, DDP's no_sync keeps the gradients local (accumulation)
        no_sync = run.distributed and not need_update and hasattr(model, 'no_sync')
        sync_ctx = model.no_sync if no_sync else contextlib.nullcontext
        with sync_ctx():
            with run.autocast():
                loss = run.train_loss_fn(model(input), target)
        step_loss, stop_any = _reduce_step_flags(run, loss, epoch, step, total)
        if stop_any > 0:
            run.stop.announce(run.stop.signum)
        loss_sum += step_loss
        loss_count += 1
        with sync_ctx():
            _backward(run, loss / update_accum, need_update)
        if need_update:
            _after_update(run)
        if args.synchronize_step:
            getattr(torch, run.device.type).synchronize()

        meter.samples += input.shape[0] * run.world_size
        if run.primary and ((step + 1) % args.log_interval == 0 or last):
            _log_train_step(run, meter, epoch, step, total, step_loss, loss_sum / loss_count)

        if need_update and stop_any > 0:
            raise Stopped(run.stop.signum or signal.SIGTERM, epoch, step)
        if (need_update and args.recovery_interval and run.saver is not None
                and (step + 1) % args.recovery_interval == 0 and not last):
            with _saving(run, 'a recovery checkpoint'):
                run.saver.save_recovery(epoch, batch_idx=step)
    return OrderedDict(loss=loss_sum / max(loss_count, 1))


@dataclass
class _StepMeter:
    """Timing of the training log lines: start of the epoch, last log line, samples since then."""
    start: float
    last: float = 0.
    samples: int = 0

    def __post_init__(self) -> None:
        self.last = self.start


def _reduce_step_flags(run: TrainRun, loss: torch.Tensor, epoch: int, step: int, total: int):
    """One small all-reduce and one host sync per step: non-finite loss anywhere, stop requested
    anywhere, summed loss (built on the device, read back once). Returns (mean loss, stop flag)."""
    loss_value = loss.detach().double()
    finite = torch.isfinite(loss_value)
    flags = torch.stack([
        (~finite).double(), loss_value.new_tensor(1. if run.stop.requested else 0.),
        torch.where(finite, loss_value, torch.zeros_like(loss_value))])
    _all_reduce_sum(flags, run.distributed)
    non_finite_any, stop_any, loss_total = flags.tolist()
    if non_finite_any > 0:
        raise UserError(
            f'non-finite loss ({loss.item()}) at epoch {epoch} step {step + 1}/{total}: stopping; '
            f'{_newest_checkpoint(run)}. Try a lower --lr, --clip-grad, or no --amp.')
    return loss_total / run.world_size, stop_any


def _backward(run: TrainRun, scaled_loss: torch.Tensor, need_update: bool) -> None:
    args, model, optimizer = run.args, run.train_model, run.optimizer
    if run.loss_scaler is not None:
        run.loss_scaler(scaled_loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        parameters=model.parameters(), need_update=need_update)
        return
    scaled_loss.backward()
    if need_update:
        if args.clip_grad is not None:
            dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
        optimizer.step()


def _after_update(run: TrainRun) -> None:
    run.optimizer.zero_grad()
    run.num_updates += 1  # before a recovery checkpoint of this step records it
    if run.model_ema is not None:
        run.model_ema.update(unwrap_model(run.train_model), step=run.num_updates)
    if run.lr_scheduler is not None:
        run.lr_scheduler.step_update(num_updates=run.num_updates)


def _log_train_step(run: TrainRun, meter: _StepMeter, epoch: int, step: int, total: int, step_loss: float,
                    avg_loss: float) -> None:
    now = time.time()
    rate = meter.samples / max(now - meter.last, 1e-9)
    per_step = (now - meter.start) / (step + 1)
    eta = per_step * (total - step - 1) + per_step * total * (run.args.epochs - epoch - 1)
    lr = run.optimizer.param_groups[0]['lr']
    _logger.info(
        f'Train: epoch {epoch} [{step + 1:>{len(str(total))}}/{total} ({100. * (step + 1) / total:3.0f}%)]  '
        f'loss {step_loss:.4f} (avg {avg_loss:.4f})  lr {lr:.3e}  {rate:.1f} img/s  '
        f'ETA {_fmt_eta(eta)}')
    meter.last, meter.samples = now, 0


@torch.no_grad()
def evaluate(model, loader, args, device, autocast, distributed: bool, rank: int, world_size: int, num_samples: int,
             no_prefetcher: bool, channels_last: bool = False, input_dtype: Optional[torch.dtype] = None):
    """Loss, top-1 and top-5 over the loader's dataset, summed exactly across processes (padding removed)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct1, correct5, count
    seen = 0
    for input, target in loader:
        if no_prefetcher:
            input, target = input.to(device, dtype=input_dtype), target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
        output = output.float()
        b = target.shape[0]
        if distributed:
            # OrderedDistributedSampler: this rank's j-th sample is position rank + j * world; >= N is padding
            pos = rank + world_size * (seen + torch.arange(b, device=device))
            valid = (pos < num_samples).to(torch.float64)
        else:
            valid = torch.ones(b, dtype=torch.float64, device=device)
        seen += b
        losses = F.cross_entropy(output, target, reduction='none').to(torch.float64)
        k = min(5, output.shape[-1])
        pred = output.topk(k, dim=-1).indices
        correct = pred.eq(target[:, None])
        sums[0] += (losses * valid).sum()
        sums[1] += (correct[:, 0].to(torch.float64) * valid).sum()
        sums[2] += (correct.any(dim=1).to(torch.float64) * valid).sum()
        sums[3] += valid.sum()
    _all_reduce_sum(sums, distributed)
    count = max(sums[3].item(), 1.)
    return OrderedDict(
        loss=sums[0].item() / count, top1=100. * sums[1].item() / count, top5=100. * sums[2].item() / count,
        count=int(sums[3].item()))


# --------------------------------------------------------------------------------------------- main
def _resume_command(resume_path: str, argv: List[str]) -> str:
    """The command that started this run (see `launch_command`), its arguments, and ``--resume PATH``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == '--resume':
            skip = True
            continue
        if a.startswith('--resume='):
            continue
        out.append(a)
    return ' '.join([launch_command()] + [shlex.quote(a) for a in out] + ['--resume', shlex.quote(resume_path)])


def train(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stop = StopRequest()
    stop.install()
    try:
        return _train(argv, stop)
    finally:
        stop.restore()


# --------------------------------------------------------------------------------------------- stages
def _setup_run(argv: List[str], stop: StopRequest) -> TrainRun:
    """Arguments, device, process group, logging and seeding."""
    parser = build_parser()
    args, notes = parse_args_with_config(parser, argv)
    _check_args(args)
    model_dtype = prepare_runtime(args)
    if args.log_wandb:
        _import_wandb()  # before any work: a missing package is one error line

    device_name = resolve_device(args.device)
    dist_info = init_distributed_device_so(device=device_name, dist_backend=args.dist_backend)
    run = TrainRun(
        argv=argv, stop=stop, args=args, device=torch.device(dist_info['device']),
        distributed=dist_info['distributed'], rank=dist_info['global_rank'], local_rank=dist_info['local_rank'],
        world_size=dist_info['world_size'], model_dtype=model_dtype)
    args.device, args.distributed, args.rank, args.world_size = (
        str(run.device), run.distributed, run.rank, run.world_size)
    setup_logging(run.primary)
    if run.distributed:
        _logger.info(f'Distributed training: {run.world_size} processes, backend '
                     f'{torch.distributed.get_backend()}, device {run.device.type}.')
    else:
        _logger.info(f'Training in one process on {run.device}.')
    for n in notes:
        _logger.warning(f'note: {n}')

    data_dir = args.data or args.data_dir
    if args.data and args.data_dir and os.path.abspath(args.data) != os.path.abspath(args.data_dir):
        raise UserError(f"two dataset roots given: '{args.data}' and --data-dir '{args.data_dir}'.")
    args.data_dir = data_dir
    if not args.model:
        raise UserError('no model given: pass --model NAME (e.g. --model noah_gmlp_ti16_224).')

    stop_when_launcher_dies()
    _on_rank0_for_all(run, lambda: _check_outputs(args))
    random_seed(args.seed, run.rank)
    return run


def _on_rank0_for_all(run: TrainRun, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only (file system checks and claims); its UserError is raised on every rank,
    so that all processes stop with one error line instead of waiting for rank 0 in a collective."""
    result, error = None, None
    if run.primary:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if run.distributed:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
    return result


def _check_outputs(args: argparse.Namespace) -> None:
    """Every folder the run will write must be writable now, not after hours of training."""
    if _continues_in_place(args):
        check_writable_folder(os.path.dirname(os.path.abspath(args.resume)), 'the folder of --resume')
    else:
        check_writable_folder(args.output or os.path.join('.', 'output', 'train'), '--output')
    if args.save_hf:
        check_writable_folder(args.save_hf, '--save-hf', create=False)


def _build_datasets(run: TrainRun) -> None:
    """Datasets first: their class count is the default --num-classes, and a bad folder fails before any work."""
    args = run.args
    keys = {k: v for k, v in dict(input_key=args.input_key, target_key=args.target_key).items() if v is not None}
    run.dataset_train = build_dataset(
        args.dataset, args.data_dir, args.train_split, is_training=True, class_map=args.class_map,
        batch_size=args.batch_size, seed=args.seed, repeats=args.epoch_repeats, input_img_mode=args.input_img_mode,
        download=args.dataset_download, num_samples=args.train_num_samples,
        trust_remote_code=args.dataset_trust_remote_code, **keys)
    run.labels = class_names(run.dataset_train)
    run.dataset_eval = build_dataset(  # numbered by the training classes
        args.dataset, args.data_dir, args.val_split, is_training=False, class_map=args.class_map,
        batch_size=args.batch_size, input_img_mode=args.input_img_mode, download=args.dataset_download,
        classes=run.labels, num_samples=args.val_num_samples, trust_remote_code=args.dataset_trust_remote_code,
        **keys)
    if args.num_classes is None:
        if not run.labels:
            raise UserError('cannot tell the number of classes of this dataset: pass --num-classes.')
        args.num_classes = len(run.labels)
        _logger.info(f'{len(run.labels)} classes found in the dataset.')
    elif run.labels and len(run.labels) > args.num_classes:
        raise UserError(f'the dataset has {len(run.labels)} classes but --num-classes is {args.num_classes}.')
    elif run.labels and len(run.labels) != args.num_classes:
        _logger.warning(
            f'warning: --num-classes {args.num_classes} but the dataset has {len(run.labels)} classes (num_classes '
            f'from the command line or --config): the model gets {args.num_classes - len(run.labels)} outputs no '
            f'image is labelled with. Leave num_classes out to use the dataset\'s count.')


def _build_model(run: TrainRun) -> None:
    """The model (initial weights, data config, gradient checkpointing, device, SyncBN) and AMP."""
    args = run.args
    model_notes: List[str] = []
    model_kwargs = _model_args(args, model_notes)
    for n in model_notes:
        _logger.warning(f'note: {n}')
    model = create_model_checked(args.model, noah_head=args.noah_head, pretrained_path=args.pretrained_path,
                                 **model_kwargs)
    if args.initial_checkpoint:
        load_initial_weights(model, args.initial_checkpoint, args.model)
        _logger.info(f'Initial weights from {args.initial_checkpoint}.')
    if args.head_init_scale is not None or args.head_init_bias is not None:
        _init_head(model, args.head_init_scale, args.head_init_bias)
    if run.primary:
        n_params = sum(p.numel() for p in model.parameters())
        _logger.info(f'Model {args.model} created, {n_params / 1e6:.3f}M parameters, {args.num_classes} classes.')

    run.data_config = resolve_data_config_checked(vars(args), model, args.model)
    if args.grad_checkpointing:
        if not hasattr(model, 'set_grad_checkpointing'):
            raise UserError(f'--grad-checkpointing: model {args.model} does not support gradient checkpointing.')
        model.set_grad_checkpointing(enable=True)
    model.to(device=run.device, dtype=run.model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn:
        if not run.distributed:
            raise UserError('--sync-bn needs a distributed run (several processes).')
        if run.device.type != 'cuda':
            raise UserError('--sync-bn needs CUDA: SyncBatchNorm has no CPU implementation.')
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            _logger.warning(f'note: --sync-bn has no effect, {args.model} has no BatchNorm layers.')
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    run.model = run.train_model = model

    amp_dtype = args.amp_dtype or ('float16' if run.device.type == 'cuda' else 'bfloat16')
    if args.amp:
        args.amp_dtype = amp_dtype
    run.autocast = amp_autocast(run.device, args.amp, amp_dtype)
    run.loss_scaler = NativeScaler(device=run.device.type) if (args.amp and amp_dtype == 'float16') else None
    if args.amp:
        _logger.info(f'AMP on: {amp_dtype}{" with a loss scaler" if run.loss_scaler else ""}.')


def _build_loaders(run: TrainRun) -> None:
    """Train / eval loaders (timm's create_loader), mixup / cutmix and the training loss."""
    args, data_config = run.args, run.data_config
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active and args.batch_size % 2:
        raise UserError(f'mixup / cutmix need an even --batch-size (pairs of images), got {args.batch_size}.')
    collate_fn = None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        if args.no_prefetcher:
            run.mixup_fn = Mixup(**mixup_args)
        else:
            collate_fn = FastCollateMixup(**mixup_args)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    workers = max(0, args.workers)
    common = dict(
        mean=data_config['mean'], std=data_config['std'], num_workers=workers, distributed=run.distributed,
        pin_memory=args.pin_mem, device=run.device, use_prefetcher=not args.no_prefetcher,
        img_dtype=run.model_dtype or torch.float32, persistent_workers=workers > 0)
    run.loader_train = create_loader(
        run.dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob or 0., gaussian_blur_prob=args.gaussian_blur_prob or 0.,
        auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats), interpolation=train_interpolation,
        collate_fn=collate_fn, use_multi_epochs_loader=args.use_multi_epochs_loader,
        worker_seeding=args.worker_seeding, **common)
    eval_batch = args.validation_batch_size or args.batch_size
    run.loader_eval = create_loader(
        run.dataset_eval, input_size=data_config['input_size'], batch_size=eval_batch, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    _protect_workers(run.loader_train)
    _protect_workers(run.loader_eval)
    if len(run.loader_train) == 0:
        raise UserError(
            f'the training split has {len(run.dataset_train)} images, fewer than one batch of {args.batch_size} '
            f'per process x {run.world_size} process(es): lower --batch-size.')

    bce = partial(BinaryCrossEntropy, target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum,
                  pos_weight=args.bce_pos_weight)
    if mixup_active:
        loss_fn = bce() if args.bce_loss else SoftTargetCrossEntropy()
    elif args.smoothing:
        loss_fn = bce(smoothing=args.smoothing) if args.bce_loss else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = bce() if args.bce_loss else nn.CrossEntropyLoss()
    run.train_loss_fn = loss_fn.to(run.device)


def _build_optimization(run: TrainRun) -> None:
    """Optimizer, resume, EMA, the model wrapped for training (DDP, torch.compile) and the LR schedule."""
    _build_optimizer(run)
    _resume(run)
    _build_ema(run)
    _wrap_for_training(run)
    _build_scheduler(run)


def _build_optimizer(run: TrainRun) -> None:
    args = run.args
    args.lr = _lr(args, run.world_size)
    opt_cfg = argparse.Namespace(**vars(args))
    opt_cfg.opt_args = args.opt_kwargs or None
    try:
        run.optimizer = create_optimizer_v2(run.model, **optimizer_kwargs(cfg=opt_cfg))
    except (ValueError, AssertionError, TypeError) as e:
        raise UserError(f"cannot create optimizer '{args.opt}': {e}") from None
    _logger.info(f'Optimizer {args.opt}, lr {args.lr:.3e} (global batch '
                 f'{args.batch_size * run.world_size * args.grad_accum_steps}).')


def _resume(run: TrainRun) -> None:
    """--resume: model weights, optimizer, loss scaler and the epoch to start at (EMA: `_build_ema`)."""
    args = run.args
    if not args.resume:
        return
    ckpt = run.resume_ckpt = safe_load(args.resume)
    sd = extract_state_dict(ckpt, use_ema=False, path=args.resume)
    check_compatible(run.model, sd, args.resume, args.model)
    run.model.load_state_dict(sd)
    if not isinstance(ckpt, dict) or 'epoch' not in ckpt:
        raise UserError(f"'{args.resume}' holds weights only, not a training checkpoint: use --initial-checkpoint.")
    if not args.no_resume_opt and 'optimizer' in ckpt:
        _check_same_optimizer(run, ckpt)
        try:
            run.optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise UserError(f"optimizer state in '{args.resume}' does not fit --opt {args.opt}: {e}") from None
    if run.loss_scaler is not None and run.loss_scaler.state_dict_key in ckpt:
        run.loss_scaler.load_state_dict(ckpt[run.loss_scaler.state_dict_key])
    mid_epoch = bool(ckpt.get('recovery'))
    run.start_epoch = int(ckpt['epoch']) + (0 if mid_epoch else 1)
    _logger.info(f"Resumed from '{args.resume}' (epoch {ckpt['epoch']}"
                 f"{', interrupted mid-epoch: that epoch restarts' if mid_epoch else ''}); "
                 f'continuing at epoch {run.start_epoch}.')


def _check_same_optimizer(run: TrainRun, ckpt: Dict[str, Any]) -> None:
    """The checkpoint's optimizer state must be of --opt's optimizer: another one's hyperparameters
    would replace this one's and fail at the first step (e.g. KeyError: 'momentum')."""
    args = run.args
    saved_opt = getattr(ckpt.get('args'), 'opt', None)
    saved_keys = {k for g in ckpt['optimizer'].get('param_groups', []) for k in g if k != 'params'}
    needed = {k for g in run.optimizer.param_groups for k in g if k != 'params'}
    if saved_opt is not None:
        differs = str(saved_opt).lower() != str(args.opt).lower()
    else:
        differs = not needed <= saved_keys
    if differs:
        which = f'--opt {saved_opt}' if saved_opt is not None else f'another optimizer ({", ".join(sorted(saved_keys))})'
        raise UserError(
            f"'{args.resume}' holds the state of {which}, not of --opt {args.opt}: resume with "
            f"{f'--opt {saved_opt}' if saved_opt is not None else 'the same --opt'}, or add --no-resume-opt to "
            f'start a fresh {args.opt} optimizer from the resumed weights.')


def _build_ema(run: TrainRun) -> None:
    args = run.args
    if not args.model_ema:
        return
    run.model_ema = ModelEmaV3(
        run.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
        device='cpu' if args.model_ema_force_cpu else None)
    if run.resume_ckpt is not None and 'state_dict_ema' in run.resume_ckpt:
        ema_sd = extract_state_dict({'state_dict': run.resume_ckpt['state_dict_ema']}, path=args.resume)
        check_compatible(run.model_ema.module, ema_sd, args.resume, args.model)
        run.model_ema.module.load_state_dict(ema_sd)
        _logger.info('Restored the EMA weights.')


def _wrap_for_training(run: TrainRun) -> None:
    args = run.args
    train_model = run.model
    if run.distributed:
        ddp_kwargs = dict(broadcast_buffers=False) if args.no_ddp_bb else {}
        if run.device.type == 'cuda':
            ddp_kwargs['device_ids'] = [run.local_rank]
        train_model = nn.parallel.DistributedDataParallel(train_model, **ddp_kwargs)
    if args.torchcompile:
        if not hasattr(torch, 'compile'):
            raise UserError('--torchcompile needs PyTorch 2 or newer.')
        train_model = torch.compile(train_model, backend=args.torchcompile, mode=args.torchcompile_mode)
    run.train_model = train_model


def _build_scheduler(run: TrainRun) -> None:
    args = run.args
    run.updates_per_epoch = (len(run.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    run.lr_scheduler, run.num_epochs = create_scheduler_v2(
        run.optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=run.updates_per_epoch)
    if args.start_epoch is not None:
        run.start_epoch = args.start_epoch
    # timm's schedulers are functions of the epoch / update count: resuming positions the schedule of this
    # command line at the resumed epoch (the checkpoint's 'scheduler' entry is informative only, so a resume
    # with more --epochs stretches the schedule instead of keeping the old one).
    if isinstance(run.lr_scheduler, PlateauLRScheduler) and run.resume_ckpt is not None:
        _restore_plateau(run, run.resume_ckpt.get('scheduler'))
    if run.lr_scheduler is not None and run.start_epoch > 0:
        if args.sched_on_updates:
            run.lr_scheduler.step_update(run.start_epoch * run.updates_per_epoch)
        else:
            run.lr_scheduler.step(run.start_epoch)
    run.num_updates = run.start_epoch * run.updates_per_epoch


def _scheduler_state(run: TrainRun) -> Optional[Dict[str, Any]]:
    sched = run.lr_scheduler
    if sched is None:
        return None
    if isinstance(sched, PlateauLRScheduler):
        # the plateau schedule depends on the metrics seen so far: keep all of torch's ReduceLROnPlateau
        # state (best, bad epochs, cooldown) and the learning rates it has reached (without noise)
        lrs = sched.restore_lr or [g['lr'] for g in run.optimizer.param_groups]
        return {'plateau': sched.lr_scheduler.state_dict(), 'lrs': [float(lr) for lr in lrs]}
    return sched.state_dict()


def _restore_plateau(run: TrainRun, state: Any) -> None:
    sched = run.lr_scheduler
    if not (isinstance(state, dict) and isinstance(state.get('plateau'), dict)):
        _logger.warning('note: the resumed checkpoint has no plateau schedule state: the plateau logic restarts.')
        return
    sched.lr_scheduler.load_state_dict(state['plateau'])
    if run.start_epoch > sched.warmup_t and len(state.get('lrs', [])) == len(run.optimizer.param_groups):
        for group, lr in zip(run.optimizer.param_groups, state['lrs']):
            group['lr'] = lr


def _checkpoint_extras(run: TrainRun, recovery: bool) -> Dict[str, Any]:
    """Entries this package adds to timm's checkpoint layout. `rng_state` is every process's random state
    at the start of the epoch a resume begins with: the next epoch, or for a recovery checkpoint its own
    epoch, which a resume replays from its first step with the same order and augmentations."""
    return {
        'scheduler': _scheduler_state(run),
        'num_updates': run.num_updates,
        'class_names': list(run.labels) if run.labels else None,  # read by noah-visualize
        'rng_state': run.epoch_start_rng if recovery else run.next_epoch_rng,
    }


def _continues_in_place(args: argparse.Namespace) -> bool:
    """--resume without --experiment continues in the resumed checkpoint's own run folder."""
    return bool(args.resume) and not args.experiment and os.path.isfile(
        os.path.join(os.path.dirname(os.path.abspath(args.resume)), 'args.yaml'))


def _prepare_output(run: TrainRun) -> None:
    """The run folder (rank 0): locked for the run's life, cleaned of what kills left, the checkpoint saver
    (with the resumed run's history), args.yaml and the summary rows kept from a resumed run."""
    args = run.args
    if _continues_in_place(args):
        wanted = os.path.dirname(os.path.abspath(args.resume))
    else:
        exp_name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'),
            str(run.data_config['input_size'][-1])])
        wanted = os.path.join(args.output or os.path.join('.', 'output', 'train'), exp_name)
    continuing = bool(args.resume) and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(wanted)
    run.summary_fields = list(SUMMARY_FIELDS) + (
        ['ema_eval_loss', 'ema_eval_top1', 'ema_eval_top5'] if run.model_ema else [])

    def _claim() -> str:
        run.lock = claim_run_folder(wanted, continuing=continuing, named=bool(args.experiment))
        return run.lock.folder
    run.output_dir = _on_rank0_for_all(run, _claim) or wanted
    if not run.primary:
        return
    if os.path.abspath(run.output_dir) != os.path.abspath(wanted):
        _logger.warning(f"note: '{wanted}' holds another run's files: this run writes to '{run.output_dir}' "
                        f'(--resume one of its checkpoints to continue that run).')
    run.saver = AtomicCheckpointSaver(
        model=run.model, optimizer=run.optimizer, args=plain_namespace(args), model_ema=run.model_ema,
        amp_scaler=run.loss_scaler, checkpoint_dir=run.output_dir, recovery_dir=run.output_dir,
        decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
        extra_state=lambda recovery: _checkpoint_extras(run, recovery))
    with _saving(run, 'the run folder'):
        removed = run.saver.remove_stale_files()
        if continuing:
            removed += run.saver.remove_recoveries(up_to_epoch=run.start_epoch - 1, keep=args.resume)
            if isinstance(run.resume_ckpt.get('saver'), dict):
                run.saver.load_state_dict(run.resume_ckpt['saver'])
        atomic_write_text(args_to_yaml(args), os.path.join(run.output_dir, 'args.yaml'))
    if removed:
        _logger.info(f'Removed what an interrupted run left: {", ".join(removed)}.')
    if args.resume:
        ckpt = run.resume_ckpt
        run.saver.newest_complete = (os.path.abspath(args.resume), int(ckpt['epoch']),
                                     ckpt.get('recovery_batch_idx') if ckpt.get('recovery') else None)
    run.summary_rows = _read_summary(run.summary_path, run.start_epoch) if continuing else []
    if args.log_wandb:
        _start_wandb(run)
    _logger.info(f'Output folder: {run.output_dir}')
    if run.saver.best_metric is not None:
        run.best_metric, run.best_epoch = run.saver.best_metric, run.saver.best_epoch


def _train_epochs(run: TrainRun) -> None:
    _logger.info(f'Training for {run.num_epochs - run.start_epoch} epoch(s) of {len(run.loader_train)} steps '
                 f'({len(run.dataset_train)} train / {len(run.dataset_eval)} val images).')
    _restore_resumed_rng(run)
    for epoch in range(run.start_epoch, run.num_epochs):
        _begin_epoch(run, epoch)
        train_metrics = train_one_epoch(run, epoch)
        if (epoch + 1) % run.args.val_interval == 0 or epoch == run.num_epochs - 1:
            row, rank_metrics = _evaluate_epoch(run, epoch, train_metrics)
        else:  # --val-interval: no evaluation and no checkpoint this epoch (as in timm)
            row = OrderedDict(epoch=epoch, train_loss=round(train_metrics['loss'], 6),
                              lr=run.optimizer.param_groups[0]['lr'])
            rank_metrics = None
        _end_epoch(run, epoch, row, rank_metrics)


def _gather_rng(run: TrainRun) -> List[Dict[str, Any]]:
    state = capture_rng_state()
    if not run.distributed:
        return [state]
    states: List[Any] = [None] * run.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _restore_resumed_rng(run: TrainRun) -> None:
    """Continue the resumed run's random streams (sample order, augmentations, dropout) where it stopped."""
    if run.resume_ckpt is None:
        return
    states = run.resume_ckpt.get('rng_state')
    if isinstance(states, list) and len(states) == run.world_size:
        restore_rng_state(states[run.rank])
        return
    # no saved state (an older checkpoint) or another number of processes: a fresh stream per epoch,
    # never epoch 0's again
    found = f'for {len(states)} process(es)' if isinstance(states, list) else 'none'
    _logger.warning(f'note: the resumed checkpoint has no random state for {run.world_size} process(es) '
                    f'({found}): sample order and augmentations continue from a new seed.')
    random_seed(run.args.seed + 1000 * run.start_epoch, run.rank)


def _begin_epoch(run: TrainRun, epoch: int) -> None:
    args = run.args
    run.epoch_start_rng = _gather_rng(run)  # before the loader draws this epoch's order
    if run.distributed and hasattr(run.loader_train.sampler, 'set_epoch'):
        run.loader_train.sampler.set_epoch(epoch)
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if run.mixup_fn is not None:
            run.mixup_fn.mixup_enabled = False
        elif hasattr(run.loader_train, 'mixup_enabled'):
            run.loader_train.mixup_enabled = False


def _evaluate_model(run: TrainRun, model: nn.Module) -> Dict[str, Any]:
    args = run.args
    return evaluate(model, run.loader_eval, args, run.device, run.autocast, run.distributed, run.rank,
                    run.world_size, len(run.dataset_eval), args.no_prefetcher, args.channels_last, run.model_dtype)


def _evaluate_epoch(run: TrainRun, epoch: int, train_metrics: Dict[str, Any]):
    """Evaluate the model (and its EMA); returns the summary row and the metrics that rank checkpoints."""
    if run.distributed and run.args.dist_bn in ('broadcast', 'reduce'):
        distribute_bn(run.model, run.world_size, run.args.dist_bn == 'reduce')
    eval_metrics = _evaluate_model(run, run.model)
    _logger.info(f'Eval: epoch {epoch}  loss {eval_metrics["loss"]:.4f}  top-1 {eval_metrics["top1"]:.2f}%  '
                 f'top-5 {eval_metrics["top5"]:.2f}%  ({eval_metrics["count"]} images)')
    row = OrderedDict(
        epoch=epoch, train_loss=round(train_metrics['loss'], 6), eval_loss=round(eval_metrics['loss'], 6),
        eval_top1=round(eval_metrics['top1'], 4), eval_top5=round(eval_metrics['top5'], 4),
        lr=run.optimizer.param_groups[0]['lr'])
    rank_metrics = eval_metrics  # with --model-ema the EMA weights rank checkpoints (as in timm)
    if run.model_ema is not None:
        ema_metrics = _evaluate_model(run, run.model_ema.module)
        _logger.info(f'Eval (EMA): epoch {epoch}  loss {ema_metrics["loss"]:.4f}  top-1 '
                     f'{ema_metrics["top1"]:.2f}%  top-5 {ema_metrics["top5"]:.2f}%')
        row.update(ema_eval_loss=round(ema_metrics['loss'], 6), ema_eval_top1=round(ema_metrics['top1'], 4),
                   ema_eval_top5=round(ema_metrics['top5'], 4))
        rank_metrics = ema_metrics
    return row, rank_metrics


def _end_epoch(run: TrainRun, epoch: int, row: Dict[str, Any], rank_metrics: Optional[Dict[str, Any]]) -> None:
    """Step the epoch schedule, then (rank 0) append the summary row, log it to W&B and save the checkpoints
    (`rank_metrics` is None between --val-interval evaluations: no checkpoint then). An epoch whose
    evaluation loss is not finite is not saved: last / best stay the last good ones."""
    metric = rank_metrics[run.args.eval_metric] if rank_metrics is not None else None
    bad = {k: v for k, v in row.items() if k.endswith('eval_loss') and not math.isfinite(v)}
    if bad:
        raise UserError(
            f'non-finite evaluation loss at epoch {epoch} ({", ".join(f"{k} {v}" for k, v in bad.items())}): '
            f'stopping without saving it; {_newest_checkpoint(run)}. Try a lower --lr, --clip-grad, or no --amp.')
    if run.lr_scheduler is not None:
        run.lr_scheduler.step(epoch + 1, metric)
    run.next_epoch_rng = _gather_rng(run)
    if run.saver is not None:
        run.summary_rows.append(row)
        with _saving(run, f'the checkpoints of epoch {epoch}'):
            _write_summary(run.summary_path, run.summary_rows, run.summary_fields)
            if rank_metrics is not None:
                run.best_metric, run.best_epoch = run.saver.save_checkpoint(epoch, metric=metric)
        if run.wandb_run is not None:
            run.wandb_run.log(dict(row), step=epoch)


def _newest_checkpoint(run: TrainRun) -> str:
    return run.saver.describe_newest_complete() if run.saver is not None else 'no checkpoint was written yet'


@contextlib.contextmanager
def _saving(run: TrainRun, what: str):
    """A failed write (full disk, quota, a folder gone) ends the run with one line naming what remains."""
    try:
        yield
    except OSError as e:
        raise UserError(f'cannot write {what} in {run.output_dir} ({e.strerror or e}); '
                        f'{_newest_checkpoint(run)}.') from None


def _stop_with_recovery(run: TrainRun, stopped: Stopped) -> int:
    """After SIGTERM / SIGINT: write the recovery checkpoint, print the resume command, exit 128 + signal."""
    name = signal.Signals(stopped.signum).name
    path = ''
    if run.saver is not None:
        with _saving(run, 'the recovery checkpoint'):
            path = run.saver.save_recovery(stopped.epoch, batch_idx=stopped.step)
    if run.distributed:
        torch.distributed.barrier()
    if run.primary:
        _logger.info(f'Stopped by {name} at epoch {stopped.epoch} step {stopped.step + 1}; recovery checkpoint: {path}')
        print(f'To resume: {_resume_command(path, run.argv)}', file=sys.stderr, flush=True)
        if run.world_size > int(os.environ.get('LOCAL_WORLD_SIZE', run.world_size)):
            print('(on every node, each with its own --node-rank)', file=sys.stderr, flush=True)
    return 128 + stopped.signum


def _finish(run: TrainRun) -> int:
    if run.best_metric is not None:
        weights = 'EMA weights' if run.model_ema is not None else 'model weights'
        _logger.info(f'*** Best metric ({weights}): {run.args.eval_metric} {run.best_metric} (epoch {run.best_epoch})')
    if run.wandb_run is not None:
        run.wandb_run.finish()
    if run.saver is not None:
        _logger.info(f'Checkpoints in {run.output_dir}')
        plot_after_training(run.output_dir)
    if run.args.save_hf and run.primary:
        _save_hf(run.args, run.output_dir, run.labels)
    if run.distributed:
        torch.distributed.barrier()
    return 0


def _already_finished(run: TrainRun) -> bool:
    if run.start_epoch < run.num_epochs:
        return False
    if not run.args.resume:
        raise UserError(f'--start-epoch {run.start_epoch} leaves nothing to train with --epochs {run.num_epochs}.')
    _logger.info(f"'{run.args.resume}' has finished epoch {run.start_epoch - 1} of {run.num_epochs}: the run is "
                 f'complete, nothing to train (a larger --epochs trains further).')
    return True


def _train(argv: List[str], stop: StopRequest) -> int:
    run = _setup_run(argv, stop)
    try:
        _build_datasets(run)
        _build_model(run)
        _build_loaders(run)
        _build_optimization(run)
        if _already_finished(run):
            return 0
        _prepare_output(run)
        try:
            _train_epochs(run)
        except Stopped as stopped:
            return _stop_with_recovery(run, stopped)
        return _finish(run)
    finally:
        for loader in (run.loader_train, run.loader_eval):
            _shut_down_workers(loader)
        if run.lock is not None:
            run.lock.release()


def _save_hf(args, output_dir: str, labels) -> None:
    try:
        from .sharing import save_pretrained_folder
    except ImportError as e:
        raise UserError(f'--save-hf needs noah_mlp.sharing.save_pretrained_folder, which is not available ({e}).') \
            from None
    best = os.path.join(output_dir, 'model_best.pth.tar')
    if not os.path.isfile(best):
        best = os.path.join(output_dir, 'last.pth.tar')
    ckpt = safe_load(best)
    model = create_model_checked(  # its weights: the checkpoint
        args.model, noah_head=args.noah_head, **dict(_model_args(args, []), pretrained=False))
    use_ema = bool(args.model_ema) and 'state_dict_ema' in ckpt
    sd = extract_state_dict(ckpt, use_ema=use_ema, path=best)
    check_compatible(model, sd, best, args.model)
    model.load_state_dict(sd)
    model.eval()
    save_pretrained_folder(model, args.save_hf, label_names=labels)
    _logger.info(f'Wrote {"EMA " if use_ema else ""}weights of {best} as a timm local-dir: folder in {args.save_hf}')


def _peer_failed(exc: BaseException) -> bool:
    """A collective broke because another process of the run died (it has printed the reason)."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return False
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        'Connection closed by peer', 'Connection reset by peer', 'remote worker crashing', 'Broken pipe'))


def main(argv: Optional[List[str]] = None) -> int:
    try:
        code = cli_main(lambda: train(argv))
    except Exception as e:
        if not _peer_failed(e):
            raise
        return 1  # quiet: the failing process printed the error; the launcher stops the run
    try:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if code == 0:
                torch.distributed.destroy_process_group()
    except Exception:  # pragma: no cover
        pass
    return code


if __name__ == '__main__':
    sys.exit(main())
