"""Frozen-tower caching: heads-only training on cached tower outputs ends where the uncached run ends (float
tolerance) and is faster. Budget: < 60 s on 2 loaded cores."""
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_cached_heads_training_matches_uncached(tmp_path, capsys):
    from echocare_clip.config import load_config
    from echocare_clip.train import train

    def run(name, *extra):
        cfg = load_config(ROOT / 'params' / 'smoke.yaml', overrides=[
            f'output.root={tmp_path / "out"}', f'output.name={name}', f'data.cache_dir={tmp_path / "cache"}',
            'data.phantom_n=120', 'data.phantom_heldout_n=0', 'data.heldout=[]', 'data.augment=false',
            'model.finetune=heads', 'train.epochs=3', 'train.batch_size=16', 'train.lr_heads=0.003',
            'train.threads=1', 'train.collapse_patience=0', 'model.text_max_length=16', *extra])
        return train(cfg)

    plain = run('uncached', 'train.cache_frozen=false')
    cached = run('cached')
    log = (cached / 'train.log').read_text()
    assert 'image features of train' in log and 'distinct captions' in log  # both towers were cached
    assert 'image features' not in (plain / 'train.log').read_text()
    a = load_file(str(plain / 'checkpoints' / 'last' / 'model.safetensors'))
    b = load_file(str(cached / 'checkpoints' / 'last' / 'model.safetensors'))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f'{k}: {m}')
    ha, hb = pd.read_csv(plain / 'history.csv'), pd.read_csv(cached / 'history.csv')
    assert (ha['val/loss'] - hb['val/loss']).abs().max() < 1e-4
    assert ha['val/loss'].iloc[-1] != ha['val/loss'].iloc[0]  # the heads trained
    epoch_s = lambda h: h['seconds'].iloc[1:].sum()
    factor = epoch_s(ha) / epoch_s(hb)
    with capsys.disabled():
        print(f'\nfrozen-tower cache: epochs take {epoch_s(ha):.2f} s uncached, {epoch_s(hb):.2f} s cached ({factor:.1f}x faster)')
    assert factor > 1.5
