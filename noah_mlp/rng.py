"""The random state a training process draws from, captured into checkpoints and restored on resume.

Python's ``random``, NumPy's global generator, torch's CPU generator and the current CUDA device's
generator (when CUDA is in use). With ``--workers 0`` every random draw of a training run (sample
order, augmentations, mixup, dropout) comes from these, so restoring them makes a resumed run
repeat a straight run bit for bit. Loader worker processes hold generators of their own, seeded
when they start; those are not captured.
"""
import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ['capture_rng_state', 'restore_rng_state']


def capture_rng_state() -> Dict[str, Any]:
    """This process's generators, as plain containers and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        'python': random.getstate(),
        'numpy': {
            'bit_generator': np_state['bit_generator'],
            'key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
            'pos': int(np_state['state']['pos']),
            'has_gauss': int(np_state['has_gauss']),
            'gauss': float(np_state['gauss']),
        },
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    np_state = state['numpy']
    np.random.set_state({
        'bit_generator': np_state['bit_generator'],
        'state': {'key': np_state['key'].numpy().astype(np.uint32), 'pos': np_state['pos']},
        'has_gauss': np_state['has_gauss'],
        'gauss': np_state['gauss'],
    })
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
