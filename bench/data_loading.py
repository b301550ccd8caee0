"""Images/s of the data pipeline: cold decode (PNG -> gray -> square -> .npy cache) vs warm disk cache vs in memory.

Not a test. Usage: python bench/data_loading.py [--config params/shared/corpus.yaml] [--n 1000] [--size 128]
Uses the shared corpus when present, else the default (phantom) configuration; the caches live in a temporary folder
under bench/_work/ that is removed afterwards.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from echocare_clip.config import load_config, Config
from echocare_clip.data import ImageDataset, build_manifest, find_shared_root


def _rate(ds, idx, label: str, repeats: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(repeats):
        for i in idx: ds[i]
    dt = time.perf_counter() - t
    rate = len(idx) * repeats / dt
    print(f'{label:<44} {rate:9.0f} images/s  ({len(idx) * repeats} in {dt:.2f} s)')
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent.parent
    default = here / 'params/shared/corpus.yaml'
    p.add_argument('--config', default=str(default) if find_shared_root() else '')
    p.add_argument('--n', type=int, default=1000, help='images per measurement')
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = here / 'bench' / '_work'
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work))
    try:
        overrides = [f'data.cache_dir={tmp}', f'data.image_size={a.size}']
        cfg = load_config(a.config, overrides=overrides) if a.config else load_config(overrides=overrides)
        t = time.perf_counter()
        manifest, report = build_manifest(cfg)
        print(f'manifest: {len(manifest)} images from {manifest.dataset.nunique()} datasets, built cold in {time.perf_counter() - t:.1f} s '
              f'(decode + hash every image once)')
        t = time.perf_counter(); build_manifest(cfg)
        print(f'manifest rebuilt with a warm image index in {time.perf_counter() - t:.2f} s')
        idx = list(range(min(a.n, len(manifest))))
        print(f'\n{len(idx)} images, {a.size} px, resize={cfg.data.resize}, 1 process, {a.threads} torch thread(s)')
        cold = _rate(ImageDataset(manifest, cfg.data, train=False), idx, 'cold: decode + square + write cache')
        warm = _rate(ImageDataset(manifest, cfg.data, train=False), idx, 'warm: disk cache (.npy)')
        mem = ImageDataset(manifest, cfg.data, train=False, in_memory=True)
        for i in idx: mem.square(i)
        hot = _rate(mem, idx, 'hot: in-memory cache', repeats=3)
        aug = _rate(ImageDataset(manifest, cfg.data, train=True), idx, 'warm + train augmentation')
        print(f'\nwarm / cold: {warm / cold:.1f}x   in-memory / cold: {hot / cold:.1f}x')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
