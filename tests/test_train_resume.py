"""Bit-exact resume: a training run killed with SIGKILL in the middle of an epoch and continued with
`--resume latest` ends with exactly the weights of an uninterrupted run (CPU). Budget: < 60 s on 2 loaded cores."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / 'params' / 'smoke.yaml'


def _overrides(tmp: Path, out: str) -> list[str]:
    return [f'output.root={tmp / out}', f'data.cache_dir={tmp / "cache"}', 'data.phantom_n=80', 'data.phantom_heldout_n=0',
            'data.heldout=[]', 'train.epochs=3', 'train.batch_size=16', 'train.threads=1', 'model.finetune=full',
            'train.collapse_patience=0', 'train.warmup_steps=2', 'model.text_max_length=16']


def _weights(run: Path) -> dict:
    return load_file(str(run / 'checkpoints' / 'last' / 'model.safetensors'))


def _cli(tmp: Path, out: str, *extra) -> list[str]:
    return [sys.executable, '-m', 'echocare_clip.train', '--config', str(SMOKE), '-o', *_overrides(tmp, out), *extra]


def _env():
    return {**os.environ, 'PYTHONHASHSEED': '0', 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    from echocare_clip.config import load_config
    from echocare_clip.train import train
    # the reference: one uninterrupted run, in this process
    ref = train(load_config(SMOKE, overrides=_overrides(tmp_path, 'ref')))
    assert json.loads((ref / 'train_status.json').read_text())['status'] == 'completed'

    # the same configuration in a subprocess, killed as soon as epoch 1 is checkpointed (in the middle of epoch 2)
    proc = subprocess.Popen(_cli(tmp_path, 'cut'), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = None
    deadline = time.time() + 300  # generous: a loaded machine is slow to reach epoch 1
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / 'cut').glob('*/*/checkpoints/last/training_state.json'))
        if found:
            state = json.loads(found[0].read_text()); break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, f'the run ended on its own before it could be killed:\n{out[-2000:]}'
    assert state is not None and state['epoch'] < 3, out[-2000:]
    run = found[0].parents[2]

    # --resume latest finds the run folder of this configuration and continues from checkpoints/last
    res = subprocess.run(_cli(tmp_path, 'cut', '--resume', 'latest'), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f'resumed from' in res.stdout and 'epoch 3/3' in res.stdout, res.stdout
    assert json.loads((run / 'train_status.json').read_text())['status'] == 'completed'

    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f'{len(differ)} tensors differ after resume, e.g. {differ[:3]}'
    # the weights did change during training (the comparison is not between two untrained models)
    import pandas as pd
    h_ref, h_run = pd.read_csv(ref / 'history.csv'), pd.read_csv(run / 'history.csv')
    assert list(h_run['epoch']) == [0, 1, 2, 3]
    pd.testing.assert_series_equal(h_ref['val/loss'], h_run['val/loss'])
    assert h_ref['val/loss'].iloc[-1] != h_ref['val/loss'].iloc[0]
