"""Distributed training equals one process: two CPU ranks (gloo) on halves of a global batch give the loss, gradients
and updated weights of one process on the whole batch (features gathered by the loss, gradients reduced by the trainer).
Budget: < 60 s on 2 loaded cores."""
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

N, SIZE = 8, 32  # global batch and image side
CAPTIONS = ['benign breast lesion', 'malignant breast lesion', 'normal breast', 'benign breast lesion',
            'a-lines in the lung', 'normal breast', 'fatty liver', 'benign breast lesion']


def _model():
    from echocare_clip.config import ModelConfig
    from echocare_clip.models import build_model
    torch.manual_seed(0)
    # the whole model trains, so gradients cross both towers, both heads and the temperature
    return build_model(ModelConfig(image_tower='tiny-vit', text_tower='tiny-clip-text', text_max_length=16, finetune='full'))


def _step(info):
    "One optimiser step of the trainer on this rank's shard of the global batch: (loss, grads, new weights)."
    from echocare_clip.config import TrainConfig
    from echocare_clip.loss import ClipLoss
    from echocare_clip.train import dup_codes, optimizer_step, param_groups, shard
    torch.set_num_threads(1)
    model = _model().train()
    tcfg = TrainConfig(lr_heads=1e-3, lr_encoders=1e-3, grad_clip=1.0)
    groups = param_groups(model, tcfg)
    optimizer = torch.optim.AdamW(groups)
    params = [p for g in groups for p in g['params']]
    images = torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mine = shard(list(range(N)), info.rank, info.world)
    tokens = model.tokenize([CAPTIONS[i] for i in mine])
    keys = dup_codes(CAPTIONS)[mine]  # duplicates among the captions exercise the dedup targets across ranks
    loss, _ = optimizer_step(model, ClipLoss(dedup=True), [(images[mine], tokens, keys)], optimizer, params, info, tcfg)
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {f'grad.{names[id(p)]}': p.grad.detach().clone() for p in params}
    weights = {f'weight.{n}': p.detach().clone() for n, p in model.named_parameters()}
    return loss, grads, weights


def _worker(rank: int, world: int, init_file: str, out: str):
    from echocare_clip.train import DistInfo
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        loss, grads, weights = _step(DistInfo(rank=rank, world=world))
        save_file({'loss': torch.tensor(loss), **grads, **weights}, f'{out}/rank{rank}.safetensors')
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process():
    from echocare_clip.train import DistInfo
    loss, grads, weights = _step(DistInfo())
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, f'{tmp}/init', tmp), nprocs=2, start_method='spawn', join=True)
        ranks = [load_file(f'{tmp}/rank{r}.safetensors') for r in range(2)]
    for r in ranks:  # every rank ends with the same loss, gradients and weights as the single process
        assert abs(float(r['loss']) - loss) < 1e-5, (float(r['loss']), loss)
        for k, g in grads.items():
            torch.testing.assert_close(r[k], g, rtol=1e-4, atol=1e-6, msg=lambda m: f'{k}: {m}')
        for k, w in weights.items():  # Adam's first step is ~lr * sign(grad): float noise in near-zero grads moves it a bit
            torch.testing.assert_close(r[k], w, rtol=0, atol=1e-4, msg=lambda m: f'{k}: {m}')
    # the gradients are not trivially zero: the check compares something
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert float(grads['grad.log_logit_scale'].abs()) > 0


def test_torchrun_training_matches_one_process(tmp_path):
    "`torchrun --nproc_per_node 2 -m echocare_clip.train` trains the run one process trains (CPU, gloo)."
    import json
    import subprocess
    import sys
    import pandas as pd
    from echocare_clip.config import load_config
    from echocare_clip.train import train
    root = Path(__file__).resolve().parents[1]
    ov = lambda out: [f'output.root={tmp_path / out}', f'data.cache_dir={tmp_path / "cache"}', 'data.phantom_n=64',
                      'data.phantom_heldout_n=0', 'data.heldout=[]', 'train.epochs=2', 'train.batch_size=8',
                      'train.threads=1', 'model.finetune=full', 'train.warmup_steps=1', 'model.text_max_length=16',
                      'data.augment=false', 'train.collapse_patience=0']
    one = train(load_config(root / 'params' / 'smoke.yaml', overrides=ov('one')))
    env = {**os.environ, 'PYTHONHASHSEED': '0', 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
                          '-m', 'echocare_clip.train', '--config', str(root / 'params' / 'smoke.yaml'), '-o', *ov('two')],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = next((tmp_path / 'two').glob('*/*/history.csv')).parent
    assert 'ranks 2' in (two / 'train.log').read_text()
    assert json.loads((two / 'train_status.json').read_text())['status'] == 'completed'
    h1, h2 = pd.read_csv(one / 'history.csv'), pd.read_csv(two / 'history.csv')
    assert list(h2['epoch']) == [0, 1, 2] and list(h2['step']) == list(h1['step'])
    for col in ('train/loss', 'val/loss', 'val/alignment_gap'):
        assert (h1[col] - h2[col]).abs().max() < 2e-3 or col == 'train/loss' and h1[col].isna().iloc[0], (col, h1[col], h2[col])
    a = load_file(str(one / 'checkpoints' / 'last' / 'model.safetensors'))
    b = load_file(str(two / 'checkpoints' / 'last' / 'model.safetensors'))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 5e-3, worst  # a few Adam steps of float-rounding differences, far below one learning-rate step each
