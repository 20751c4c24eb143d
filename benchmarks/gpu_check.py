"""One command that checks the CUDA path of noah-mlp and prints its GPU performance figures.

    python benchmarks/gpu_check.py               # on a CUDA machine: every check, < 10 minutes
    python benchmarks/gpu_check.py --smoke       # tiny sizes on the CPU (automatic without CUDA), < 1 minute

Installs nothing and downloads nothing: the data are the digits that ship inside scikit-learn,
models start from random weights, and the repository's own code is imported (no `pip install`
needed). Every line of the output is PASS / FAIL / SKIP (with the reason) / INFO / GOAL; the exit
status is 0 only when nothing FAILed. Performance goals are printed as GOAL met / missed and do
not change the exit status (a shared GPU's noise is not a bug).

1. formula: NoahHead against the plain NOAH formula (per-token projections, softmax over tokens,
   weighted sum; `tests/test_head.py`'s reference, in float64 on the CPU) for every
   (N, r, kv_split, head_split) family of the CPU tests, forward and every gradient, in fp32
   (relative error <= 1e-5 forward, 1e-4 gradients), bf16 autocast (2e-2 / 5e-2) and fp16 autocast
   (5e-3 / 1e-2); with head dropout, in each dtype, the logits' mean and variance over 6,000
   independent draws against the formula's (unbiased; Var = p/(1-p) sum_{n,l} (a v)^2).
2. sdpa: which SDPA kernel ran (profiler op names: flash / efficient / cudnn / math, or NOAH's own
   chunked CPU kernel) for the head without and with dropout, fp32 / bf16 / fp16; FAIL where it is the
   math fallback although a fused kernel applies (any CUDA case; on the CPU, no dropout). Also
   whether the batch-broadcast class queries (expand, stride 0) are copied or change the kernel.
3. train: `train.py` with --amp bf16 + --channels-last + --torchcompile + EMA + --pin-mem, with
   --amp fp16 (loss scaler) + EMA, and through `distributed_train.sh <all GPUs>` (NCCL DDP and
   --sync-bn from 2 GPUs on); then `validate.py` on each result, whose top-1 must equal the
   training run's last evaluation.
4. perf (bf16 autocast, B=128, 224 px; goals from issue 12): training step and inference of
   noah_gmlp_ti16_224 / noah_gmlp_s16_224 / noah_mixer_b16_224 vs their linear-head siblings
   (<= +3%), peak memory of a training step (<= +3%), the head alone vs the grouped-conv
   formulation (>= 5x faster, <= 1/10 of its saved-for-backward bytes), train.py's img/s vs the
   bare training step.

CUDA branches of the package and the check that reaches each (`tests/test_gpu_check.py` keeps this
table complete: every code line of `noah_mlp/` with a name matching CUDA_PATTERNS, or the string
'cuda', must be listed in CUDA_BRANCHES):
"""
import argparse
import contextlib
import copy
import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, 'benchmarks'), os.path.join(REPO, 'tests')):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (module, text on the line, check that reaches it)
CUDA_BRANCHES = [
    ('noah_mlp/cli_common.py', "'cuda' if torch.cuda.is_available()", 'train, perf (auto device picks CUDA)'),
    ('noah_mlp/cli_common.py', "kind == 'cuda'", 'train (--device cuda:0 in the fp16 run)'),
    ('noah_mlp/cli_common.py', "device.type == 'cuda' and dtype == torch.bfloat16", 'train (--amp-dtype bfloat16)'),
    ('noah_mlp/head.py', 'key.is_cuda', 'formula, sdpa (head sizes padded to multiples of 8)'),
    ('noah_mlp/train.py', "device.type != 'cuda'", 'train (distributed --sync-bn, from 2 GPUs)'),
    ('noah_mlp/train.py', "device.type == 'cuda' else 'bfloat16'", 'train (distributed run: --amp without a dtype)'),
    ('noah_mlp/train.py', "device.type == 'cuda':", 'train (distributed run: DDP device_ids, from 2 GPUs)'),
    ('noah_mlp/train.py', 'NativeScaler', 'train (--amp-dtype float16: loss scaler)'),
    ('noah_mlp/train.py', 'pin_memory', 'train (--pin-mem)'),
    ('noah_mlp/train.py', 'init_distributed_device_so', 'train (distributed run: timm picks NCCL on CUDA)'),
    ('noah_mlp/train.py', 'sync_bn', 'train (distributed --sync-bn, from 2 GPUs)'),
    ('noah_mlp/train.py', 'SyncBatchNorm', 'train (distributed --sync-bn, from 2 GPUs)'),
    ('noah_mlp/validate.py', "device.type == 'cuda' else 'bfloat16'", 'train (validate.py --amp without a dtype)'),
    ('noah_mlp/validate.py', 'pin_memory', 'train (validate.py --pin-mem)'),
    ('noah_mlp/rng.py', 'torch.cuda.is_initialized()', 'train (every checkpoint of a CUDA run holds its CUDA generator)'),
    ('noah_mlp/rng.py', "state['cuda'] = torch.cuda.get_rng_state()", 'train (the same)'),
    ('noah_mlp/rng.py', "if 'cuda' in state", 'train (the --resume run restores the CUDA generator)'),
    ('noah_mlp/rng.py', "torch.cuda.set_rng_state(state['cuda'])", 'train (the same)'),
]
# names in code (not in docstrings, comments or messages) that mark a CUDA-only path
CUDA_PATTERNS = re.compile(r"cuda|nccl|NativeScaler|GradScaler|pin_mem|sync_bn|SyncBatchNorm|init_distributed",
                           re.IGNORECASE)
__doc__ += '\n'.join(f'    {module}: {text!r} -> {check}' for module, text, check in CUDA_BRANCHES) + '\n'

SIBLINGS = [('noah_gmlp_ti16_224', 'gmlp_ti16_224'), ('noah_gmlp_s16_224', 'gmlp_s16_224'),
            ('noah_mixer_b16_224', 'mixer_b16_224')]
# relative error ||out - ref|| / ||ref|| allowed (forward, gradients)
TOLERANCES = {'fp32': (1e-5, 1e-4), 'bf16': (2e-2, 5e-2), 'fp16': (5e-3, 1e-2)}
AMP_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


# ------------------------------------------------------------------------------------------ report
class Report:
    """Prints each result as it comes and counts them; `exit_status` is 1 when anything failed."""

    def __init__(self, judge_goals: bool = True) -> None:
        self.rows: List[Dict[str, str]] = []
        self.judge_goals = judge_goals  # smoke sizes on a CPU say nothing about the GPU goals

    def add(self, status: str, check: str, item: str, detail: str = '') -> None:
        self.rows.append(dict(status=status, check=check, item=item, detail=detail))
        print(f'{status:5s} {check:8s} {item}{": " + detail if detail else ""}', flush=True)

    def result(self, ok: bool, check: str, item: str, detail: str = '') -> bool:
        self.add('PASS' if ok else 'FAIL', check, item, detail)
        return ok

    def goal(self, met: bool, check: str, item: str, detail: str) -> None:
        if self.judge_goals:
            self.add('GOAL', check, item, f'{"met" if met else "MISSED"}: {detail}')
        else:
            self.add('INFO', check, item, f'{detail} (not judged at smoke sizes)')

    def guard(self, check: str, item: str, fn: Callable[[], None]) -> None:
        """Run one check; an exception is that check's FAIL (with its last lines), not the end of the run."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
            tail = traceback.format_exc().strip().splitlines()[-3:]
            self.add('FAIL', check, item, f'{type(e).__name__}: {e} | ' + ' | '.join(t.strip() for t in tail))

    def exit_status(self) -> int:
        return 1 if any(r['status'] == 'FAIL' for r in self.rows) else 0

    def summary(self) -> str:
        counts = {s: sum(r['status'] == s for r in self.rows) for s in ('PASS', 'FAIL', 'SKIP', 'GOAL')}
        missed = sum(r['status'] == 'GOAL' and 'MISSED' in r['detail'] for r in self.rows)
        return (f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped, "
                f"{counts['GOAL'] - missed}/{counts['GOAL']} performance goals met")


def rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """||a - ref|| / max(||ref||, floor); `floor` keeps a gradient that is truly 0 (query.bias's) from
    dividing its rounding error by nothing."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - ref).norm() / max(float(ref.norm()), floor))


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def dtypes_for(device: torch.device) -> List[str]:
    names = ['fp32', 'bf16', 'fp16']
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        names.remove('bf16')
    return names


# ------------------------------------------------------------------------------------------ 1. formula
def check_formula(rep: Report, device: torch.device, smoke: bool) -> None:
    from noah_mlp import NoahHead
    from test_head import CASES, _randomise, reference_noah

    for dtype_name in dtypes_for(device):
        tol_fwd, tol_grad = TOLERANCES[dtype_name]
        worst_fwd, worst_grad, failed = 0., 0., []
        for C, N, r, K, L, kv_split, head_split in CASES:
            torch.manual_seed(0)
            head64 = _randomise(NoahHead(C, K, num_heads=N, key_ratio=r, drop=0., kv_split=kv_split,
                                         head_split=head_split).double())
            x64 = torch.randn(3, L, C, dtype=torch.float64, requires_grad=True)
            ref = reference_noah(head64, x64)
            grad_out = torch.randn_like(ref)
            ref_grads = torch.autograd.grad(ref, [x64] + list(head64.parameters()), grad_out)

            head = copy.deepcopy(head64).float().to(device)
            x = x64.detach().float().to(device).requires_grad_()
            with autocast(device, AMP_DTYPES[dtype_name]):
                out = head(x)
            grads = torch.autograd.grad(out.float(), [x] + list(head.parameters()), grad_out.float().to(device))
            e_fwd = rel_err(out, ref)
            floor = 1e-3 * max(float(e.norm()) for e in ref_grads)
            e_grad = max(rel_err(g, e, floor) for g, e in zip(grads, ref_grads))
            worst_fwd, worst_grad = max(worst_fwd, e_fwd), max(worst_grad, e_grad)
            if not (e_fwd <= tol_fwd and e_grad <= tol_grad):
                failed.append(f'C={C} N={N} r={r} K={K} L={L} kv_split={kv_split} head_split={head_split}: '
                              f'{e_fwd:.1e} / {e_grad:.1e}')
        rep.result(not failed, 'formula', f'{dtype_name} on {device.type}, {len(CASES)} head families',
                   f'worst relative error forward {worst_fwd:.1e} (<= {tol_fwd:g}), gradients {worst_grad:.1e} '
                   f'(<= {tol_grad:g})' + (f'; failing: {"; ".join(failed)}' if failed else ''))

    for dtype_name in dtypes_for(device):
        for kv_split, head_split in ((True, True), (False, False)):
            check_dropout_statistics(rep, device, dtype_name, kv_split, head_split)


def check_dropout_statistics(rep: Report, device: torch.device, dtype_name: str, kv_split: bool,
                             head_split: bool) -> None:
    """Mean and variance of the logits over independent dropout draws against the formula's."""
    from noah_mlp import NoahHead
    from test_head import _randomise, reference_noah

    C, N, K, L, p, draws = 16, 2, 4, 6, 0.3, 6000
    torch.manual_seed(0)
    head64 = _randomise(NoahHead(C, K, num_heads=N, drop=p, kv_split=kv_split, head_split=head_split).double())
    x64 = torch.randn(1, L, C, dtype=torch.float64)
    with torch.no_grad():
        clean = reference_noah(head64, x64)[0]
        ones = torch.ones(1, N, K, L, dtype=torch.float64)
        # Var[out[k]] = p/(1-p) sum_{n,l} (a v)^2: each term is the formula with a one-hot mask on (n, l)
        terms = [reference_noah(head64, x64, value_mask=ones * F.one_hot(torch.tensor(n * L + l), N * L)
                                .reshape(1, N, 1, L).to(ones))[0] ** 2 for n in range(N) for l in range(L)]
        expected_var = p / (1 - p) * torch.stack(terms).sum(0)
        head = copy.deepcopy(head64).float().to(device).train()
        x = x64.float().to(device).expand(draws, L, C)  # one batch row per draw: independent masks
        with autocast(device, AMP_DTYPES[dtype_name]):
            outs = head(x).double().cpu()
    mean, var = outs.mean(0), outs.var(0)
    std_err = (expected_var / draws).sqrt()
    rounding = 0. if dtype_name == 'fp32' else TOLERANCES[dtype_name][0] * clean.abs().max()
    mean_ok = bool(torch.all((mean - clean).abs() <= 5 * std_err + rounding + 1e-6))
    var_err = float(((var - expected_var).abs() / expected_var).max())
    rep.result(mean_ok and var_err <= 0.12, 'formula',
               f'dropout p={p} statistics, {dtype_name}, kv_split={kv_split} head_split={head_split}, {draws} draws',
               f'max |mean - formula| / std.err. {float(((mean - clean).abs() / std_err).max()):.1f} (<= 5'
               f'{" + rounding" if rounding else ""}), max relative variance error {var_err:.3f} (<= 0.12)')


# ------------------------------------------------------------------------------------------ 2. sdpa
SDPA_OPS = [  # profiler op name fragment -> backend
    ('_scaled_dot_product_flash_attention', 'flash'),
    ('_scaled_dot_product_efficient_attention', 'efficient'),
    ('_scaled_dot_product_cudnn_attention', 'cudnn'),
    ('_scaled_dot_product_attention_math', 'math'),
    ('_ChunkedDropoutAttention', 'chunked'),
]


def profiled_ops(fn: Callable[[], None], device: torch.device) -> Tuple[List[str], List[Tuple[str, list]]]:
    """(sorted op and kernel names, [(op name, input shapes)]) of everything `fn` ran."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    events = prof.events()
    return sorted({e.name for e in events}), [(e.name, e.input_shapes) for e in events]


def backends_of(names: List[str]) -> List[str]:
    return sorted({backend for fragment, backend in SDPA_OPS if any(fragment in n for n in names)})


def check_sdpa(rep: Report, device: torch.device, smoke: bool) -> None:
    from noah_mlp import NoahHead
    from noah_mlp.head import class_attention

    B, L, C, K = (4, 16, 32, 50) if smoke else (8, 196, 128, 1000)
    cuda = device.type == 'cuda'
    for dtype_name in dtypes_for(device):
        for drop in (0., 0.1):
            torch.manual_seed(0)
            head = NoahHead(C, K, num_heads=4, drop=drop).to(device).train()
            x = torch.randn(B, L, C, device=device, requires_grad=True)

            def step():
                with autocast(device, AMP_DTYPES[dtype_name]):
                    out = head(x)
                out.float().sum().backward()

            step()  # warm-up: kernel selection and lazy initialisation stay out of the profile
            names, _ = profiled_ops(step, device)
            found = backends_of(names)
            kernels = [n[:70] for n in names if any(k in n.lower() for k in ('flash', 'fmha', 'attention', 'cudnn'))
                       and not n.startswith('aten::') and 'Backward' not in n][:4]  # CUDA kernel names are long
            if cuda:
                ok = bool(found) and 'math' not in found
                why = 'a fused kernel applies to every CUDA case'
            elif drop == 0.:
                ok = found == ['flash']
                why = "CPU without dropout: SDPA's fused CPU flash kernel"
            elif dtype_name == 'fp32':
                ok = found == ['chunked']
                why = "CPU fp32 with dropout: NOAH's chunked kernel"
            else:
                ok = True
                why = "CPU autocast with dropout: no fused CPU kernel takes dropout, SDPA's math backend is expected"
            rep.result(ok, 'sdpa', f'head {dtype_name}, dropout {drop}, B={B} L={L} C={C} K={K}',
                       f'backend {"+".join(found) or "none found"} ({why})'
                       + (f'; kernels {", ".join(kernels)}' if kernels else ''))

    # The class queries are shared by the batch: expand(B, ...) gives them stride 0 in the batch dim.
    N, D = 4, 16
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    q = torch.randn(N, K, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, N, L, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, N, L, D, device=device, dtype=dtype, requires_grad=True)
    results = {}
    for layout in ('broadcast', 'contiguous'):
        def run(layout=layout):
            if layout == 'broadcast':
                out = class_attention(q, k, v)
            else:  # the same call with a materialised (B, N, K, D) copy of the queries
                qb = q.unsqueeze(0).expand(B, -1, -1, -1).contiguous()
                out = F.scaled_dot_product_attention(qb, k, v, scale=1.0)
            out.float().sum().backward()

        run()
        names, shaped = profiled_ops(run, device)
        copies = [name for name, shapes in shaped
                  if name in ('aten::contiguous', 'aten::clone', 'aten::copy_', 'aten::_to_copy')
                  and any(list(s) == [B, N, K, D] for s in shapes if isinstance(s, (list, tuple)))]
        results[layout] = (backends_of(names), copies)
    (b_backend, b_copies), (c_backend, _) = results['broadcast'], results['contiguous']
    rep.result('math' not in b_backend or 'math' in c_backend, 'sdpa',
               f'batch-broadcast class queries (stride 0), {str(dtype).replace("torch.", "")}',
               f'backend {"+".join(b_backend)} (contiguous queries: {"+".join(c_backend)}); '
               + (f'copied by {", ".join(sorted(set(b_copies)))}' if b_copies else 'no (B, N, K, D) copy made'))


# ------------------------------------------------------------------------------------------ 3. train
def _run(cmd: List[str], log_path: str, timeout: float, env: Optional[dict] = None) -> Tuple[int, str]:
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHON=sys.executable)  # bash scripts: this interpreter
    full_env.update(env or {})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code = 124
        text = (e.stdout or b'').decode(errors='replace') + (e.stderr or b'').decode(errors='replace')
    with open(log_path, 'w') as f:
        f.write(' '.join(cmd) + '\n\n' + text)
    return code, text


def _last_summary_row(exp_dir: str) -> Dict[str, str]:
    with open(os.path.join(exp_dir, 'summary.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def training_runs(device: torch.device, smoke: bool, runs_dir: str = 'runs') -> List[Tuple[str, List[str], List[str], List[str]]]:
    """(name, launcher, extra train.py args, log lines that must appear) of each training run; run{i} writes
    to `runs_dir`/run{i}."""
    py = [sys.executable, os.path.join(REPO, 'train.py')]
    if device.type != 'cuda':  # one run through the launcher; tests/test_train.py covers the CPU paths in depth
        return [
            ('distributed_train.sh 2 (gloo) + bf16 amp + channels-last + EMA',
             ['bash', os.path.join(REPO, 'distributed_train.sh'), '2'],
             ['--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--model-ema'],
             ['backend gloo', 'AMP on: bfloat16']),
        ]
    ngpu = torch.cuda.device_count()
    dist_extra = ['--amp', '--model-ema', '--channels-last', '--pin-mem'] + (['--sync-bn'] if ngpu >= 2 else [])
    dist_expect = ['AMP on: float16 with a loss scaler'] + (['backend nccl'] if ngpu >= 2 else [])
    return [
        ('bf16 amp + channels-last + torchcompile + EMA + pin-mem', py,
         ['--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--torchcompile', 'inductor', '--model-ema',
          '--pin-mem', '--workers', '4'], ['AMP on: bfloat16', 'on cuda']),
        ('fp16 amp (loss scaler) + EMA, --device cuda:0', py,
         ['--amp', '--amp-dtype', 'float16', '--model-ema', '--device', 'cuda:0', '--workers', '4'],
         ['AMP on: float16 with a loss scaler']),
        (f'distributed_train.sh {ngpu} (NCCL)' + (' + sync-bn' if ngpu >= 2 else ''),
         ['bash', os.path.join(REPO, 'distributed_train.sh'), str(ngpu)], dist_extra + ['--workers', '2'],
         dist_expect),
        ('--resume of the fp16 run for one more epoch (RNG state, CUDA generator included, restored)', py,
         ['--amp', '--amp-dtype', 'float16', '--model-ema', '--resume', os.path.join(runs_dir, 'run1', 'last.pth.tar'),
          '--epochs', str((1 if smoke else 2) + 1)], ['continuing at epoch']),
    ]


def check_training(rep: Report, device: torch.device, smoke: bool, work: str) -> None:
    from noah_mlp.demo import DEMO_MODEL, demo_train_args, write_digits_dataset

    data = os.path.join(work, 'digits')
    write_digits_dataset(data, limit=240 if smoke else None)
    epochs = 1 if smoke else 2
    runs = training_runs(device, smoke, os.path.join(work, 'runs'))
    if device.type == 'cuda' and torch.cuda.device_count() < 2:
        rep.add('SKIP', 'train', 'NCCL DDP, DDP device_ids and --sync-bn',
                f'need 2+ GPUs, this machine has {torch.cuda.device_count()} (the distributed run is one process)')
    if device.type != 'cuda':
        rep.add('SKIP', 'train', '--torchcompile, NCCL, --pin-mem, --sync-bn, float16 on CUDA',
                'need CUDA (on the CPU, tests/test_train.py covers float16 with a loss scaler, EMA and DDP; '
                'tests/test_head_paths.py compile with backend aot_eager)')
    for i, (name, launcher, extra, expect) in enumerate(runs):
        def one(i=i, name=name, launcher=launcher, extra=extra, expect=expect):
            exp = f'run{i}'
            args = demo_train_args(data, os.path.join(work, 'runs'), epochs=epochs, batch_size=32 if smoke else 128,
                                   experiment=exp, workers=0 if smoke else 4)
            args = _drop_flag(args, '--workers') + extra
            if '--workers' not in extra:
                args += ['--workers', '0']
            log = os.path.join(work, f'train_{exp}.log')
            code, text = _run(launcher + args, log, timeout=120 if smoke else 400, env={'OMP_NUM_THREADS': '1'})
            missing = [e for e in expect if e not in text]
            if not rep.result(code == 0 and not missing, 'train', name,
                              f'exit {code}' + (f', log lacks {missing}' if missing else '') + f' (log {log})'):
                print(text[-3000:], flush=True)
                return
            exp_dir = os.path.join(work, 'runs', exp)
            row = _last_summary_row(exp_dir)
            vargs = [sys.executable, os.path.join(REPO, 'validate.py'), data, '--split', 'val', '--model', DEMO_MODEL,
                     '--checkpoint', os.path.join(exp_dir, 'last.pth.tar'), '--crop-pct', '1.0', '-b', '64',
                     '--results-file', os.path.join(exp_dir, 'validate.json')]
            use_ema = '--model-ema' in extra and i == 0
            if use_ema:
                vargs.append('--use-ema')
            if '--amp' in extra:
                vargs.append('--amp')  # without a dtype: float16 on CUDA
            if device.type == 'cuda':
                vargs += ['--pin-mem', '--channels-last', '--workers', '2']
            else:
                vargs += ['--workers', '0']
            code, text = _run(vargs, os.path.join(work, f'validate_{exp}.log'), timeout=120 if smoke else 300,
                              env={'OMP_NUM_THREADS': '1'})
            if code != 0:
                rep.result(False, 'train', f'validate.py after "{name}"', f'exit {code}: {text[-1500:]}')
                return
            with open(os.path.join(exp_dir, 'validate.json')) as f:
                top1 = float(json.load(f)['top1'])
            trained = float(row['ema_eval_top1' if use_ema else 'eval_top1'])
            # the same weights on the same images: equal up to one image flipped by AMP rounding
            images = max(1, sum(len(files) for _, _, files in os.walk(os.path.join(data, 'val'))))
            rep.result(abs(top1 - trained) <= 100. / images + 1e-6, 'train',
                       f'validate.py{" --use-ema" if use_ema else ""} after "{name}"',
                       f'top-1 {top1:.2f}% vs {trained:.2f}% at the end of training ({images} images)')
        rep.guard('train', name, one)


def _drop_flag(args: List[str], flag: str) -> List[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2:]


# ------------------------------------------------------------------------------------------ 4. perf
def check_perf(rep: Report, device: torch.device, smoke: bool, work: str) -> None:
    import timm
    import noah_mlp  # noqa: F401  (registers the models)
    from bench_model import infer_step, train_step
    from common import paired_ratio, peak_memory_growth, saved_tensor_bytes, interleaved_times

    cuda = device.type == 'cuda'
    dtype = torch.bfloat16
    batch, img = (4, 32) if smoke else (128, 224)
    rounds, repeat = (2, 1) if smoke else (10, 3)
    tiny = dict(img_size=32) if smoke else {}  # timm's own models take no other architecture override
    where = (f'{torch.cuda.get_device_name(device)}' if cuda else 'CPU smoke sizes (not a measurement)')
    rep.add('INFO', 'perf', f'B={batch}, {img} px, bf16 autocast, {rounds} interleaved rounds on {where}')

    def amp_repeat(fn):
        def run():
            for _ in range(repeat):
                with torch.autocast(device.type, dtype=dtype):
                    fn()
        return run

    for noah_name, sibling in SIBLINGS[1:] if smoke else []:
        rep.add('SKIP', 'perf', f'{noah_name} vs {sibling}', 'smoke: the first pair runs the same code')
    for noah_name, sibling in SIBLINGS[:1] if smoke else SIBLINGS:
        def pair(noah_name=noah_name, sibling=sibling):
            torch.manual_seed(0)
            models = {n: timm.create_model(n, **tiny).to(device) for n in (noah_name, sibling)}
            g = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 3, img, img, generator=g).to(device)
            y = torch.randint(0, 1000, (batch,), generator=g).to(device)
            for m in models.values():  # first steps allocate the gradients and library workspaces: not the peak
                amp_repeat(train_step(m, x, y))()
            peaks = {n: peak_memory_growth(amp_repeat(train_step(m, x, y)), device) for n, m in models.items()}
            times = interleaved_times({n: amp_repeat(train_step(m, x, y)) for n, m in models.items()}, rounds,
                                      device=device)
            q1, med, q3 = paired_ratio(times, noah_name, sibling)
            rep.goal(med <= 1.03, 'perf', f'training step {noah_name} vs {sibling}',
                     f'{100 * (med - 1):+.1f}% (IQR {100 * (q1 - 1):+.1f}..{100 * (q3 - 1):+.1f}%; goal <= +3%), '
                     f'{1e3 * min(times[sibling]) / repeat:.1f} ms per step for the sibling')
            ratio = peaks[noah_name] / max(peaks[sibling], 1)
            rep.goal(ratio <= 1.03, 'perf', f'peak memory of a training step {noah_name} vs {sibling}',
                     f'{100 * (ratio - 1):+.1f}% ({peaks[noah_name] / 2 ** 20:.0f} vs {peaks[sibling] / 2 ** 20:.0f} MiB; '
                     f'goal <= +3%)')
            times = interleaved_times({n: amp_repeat(infer_step(m, x)) for n, m in models.items()}, rounds,
                                      device=device)
            q1, med, q3 = paired_ratio(times, noah_name, sibling)
            rep.goal(med <= 1.03, 'perf', f'inference {noah_name} vs {sibling}',
                     f'{100 * (med - 1):+.1f}% (IQR {100 * (q1 - 1):+.1f}..{100 * (q3 - 1):+.1f}%; goal <= +3%)')
            del models
            if cuda:
                torch.cuda.empty_cache()
        rep.guard('perf', f'{noah_name} vs {sibling}', pair)

    def head_alone():
        from types import SimpleNamespace
        from bench_head import build, fwd_bwd
        shape = SimpleNamespace(channels=32 if smoke else 128, classes=50 if smoke else 1000, heads=4, key_ratio=0.5)
        tokens = 16 if smoke else 196
        x = torch.randn(batch, tokens, shape.channels, device=device, requires_grad=True)
        for drop in (0., 0.1):
            models = {n: m.to(device) for n, m in build(shape, drop).items() if n in ('noah', 'grouped_conv')}
            with torch.autocast(device.type, dtype=dtype):
                saved = {n: saved_tensor_bytes(lambda m=m: m(x)) for n, m in models.items()}
            times = interleaved_times({n: amp_repeat(fwd_bwd(m, x)) for n, m in models.items()}, rounds,
                                      device=device)
            q1, med, q3 = paired_ratio(times, 'grouped_conv', 'noah')
            rep.goal(med >= 5., 'perf', f'head alone vs grouped-conv, dropout {drop}, B={batch} L={tokens} '
                     f'C={shape.channels} K={shape.classes}',
                     f'{med:.1f}x faster (IQR {q1:.1f}..{q3:.1f}; goal >= 5x)')
            share = saved['noah'] / max(saved['grouped_conv'], 1)
            rep.goal(share <= 0.1, 'perf', f'saved-for-backward bytes, head alone vs grouped-conv, dropout {drop}',
                     f'1/{1 / max(share, 1e-9):.1f} ({saved["noah"] / 2 ** 20:.1f} vs '
                     f'{saved["grouped_conv"] / 2 ** 20:.1f} MiB; goal <= 1/10)')
    rep.guard('perf', 'head alone vs grouped-conv', head_alone)

    def pipeline():
        from bench_pipeline import bare_step_rate, train_py_rates
        from noah_mlp.demo import write_digits_dataset
        data = os.path.join(work, 'digits')
        if not os.path.isdir(data):
            write_digits_dataset(data, limit=240 if smoke else None)
        pbatch = 32 if smoke else 128
        bare = bare_step_rate(pbatch, 5 if smoke else 30, 1, device=str(device), amp_dtype=dtype)
        extra = ['--amp', '--amp-dtype', 'bfloat16'] + ([] if cuda else [])
        rates, wall = train_py_rates(data, os.path.join(work, 'pipeline'), pbatch, 2 if smoke else 3,
                                     0 if smoke else 4, 1, extra_args=extra)
        if not rates:
            raise RuntimeError('train.py logged no img/s after epoch 0')
        rate = sorted(rates)[len(rates) // 2]
        rep.add('INFO', 'perf', f'train.py loop vs bare training step (demo digits, B={pbatch}, bf16)',
                f'{rate:.0f} vs {bare:.0f} img/s: the loop adds {100 * (bare / rate - 1):+.0f}%')
    rep.guard('perf', 'train.py img/s vs bare step', pipeline)


# ------------------------------------------------------------------------------------------ main
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--smoke', action='store_true', help='tiny sizes on the CPU (the default without CUDA)')
    ap.add_argument('--only', nargs='+', choices=['formula', 'sdpa', 'train', 'perf'], default=None,
                    help='run only these checks')
    ap.add_argument('--work-dir', default=None, help='keep data, runs and logs here (default: a temp folder)')
    ap.add_argument('--json', default=None, metavar='FILE', help='also write every result line to FILE')
    args = ap.parse_args(argv)
    # every process started from here imports this checkout of noah_mlp, installed or not
    os.environ['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(
        os.pathsep) if p and os.path.abspath(p) != REPO])

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device('cuda' if cuda else 'cpu')
    smoke = not cuda
    if not cuda:
        torch.set_num_threads(1)
    rep = Report(judge_goals=not smoke)
    machine = (f'{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, CUDA {torch.version.cuda}'
               if cuda else f'CPU ({"--smoke" if args.smoke else "no CUDA device"})')
    import timm
    print(f'gpu_check: {machine}; torch {torch.__version__}, timm {timm.__version__}, python '
          f'{sys.version.split()[0]}', flush=True)
    if smoke:
        rep.add('SKIP', 'all', 'CUDA kernels, GPU timings and memory',
                'no CUDA here: every check runs at tiny sizes on the CPU (a smoke test of this script)')
    checks = args.only or ['formula', 'sdpa', 'train', 'perf']
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix='noah_gpu_check_'))
        os.makedirs(work, exist_ok=True)
        for name in checks:
            t = time.time()
            if name == 'formula':
                rep.guard('formula', 'formula checks', lambda: check_formula(rep, device, smoke))
            elif name == 'sdpa':
                rep.guard('sdpa', 'SDPA backend checks', lambda: check_sdpa(rep, device, smoke))
            elif name == 'train':
                rep.guard('train', 'training runs', lambda: check_training(rep, device, smoke, work))
            elif name == 'perf':
                rep.guard('perf', 'performance figures', lambda: check_perf(rep, device, smoke, work))
            print(f'      ({name}: {time.time() - t:.0f} s)', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(machine=machine, torch=torch.__version__, rows=rep.rows), f, indent=1)
    print(f'\ngpu_check: {rep.summary()} in {time.time() - t0:.0f} s on {machine}', flush=True)
    return rep.exit_status()


if __name__ == '__main__':
    sys.exit(main())
