"""Scaling with the number of images N: training seconds per epoch and evaluation seconds, phantom corpora of N images.

Not a test. Usage: python bench/scaling.py [--n 500 1000 2000 4000] [--level heads] [--size 64] [--epochs 2]
                   [--bootstrap 200] [--threads 2] [--record]

For each N: a phantom corpus of N images (generated once into bench/_work/scaling/cache, timed apart), split
70/15/15; `train(cfg)` with the default tiny model (tiny-vit + tiny-clip-text) at `--level` for `--epochs` epochs
(`heads` runs with `data.augment=false`, so both towers are cached: the cache build is reported apart from the epochs);
then evaluation of all N images as one held-out set with a random-init model: embedding extraction and the whole
metric suite (`evaluate.evaluate_rows` on the embeddings just cached, `--bootstrap` resamples). Per-1k columns make linearity visible: a flat
column is linear, a growing one is not.
"""
import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, nargs='+', default=[500, 1000, 2000, 4000])
    p.add_argument('--level', default='heads', choices=['heads', 'image', 'text', 'full'])
    p.add_argument('--size', type=int, default=64, help='image side (phantom and model input), pixels')
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--bootstrap', type=int, default=200)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--record', action='store_true', help='write the table into bench/RESULTS.md')
    a = p.parse_args(argv)
    for v in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'): os.environ[v] = str(a.threads)
    os.environ.setdefault('TQDM_DISABLE', '1')
    import pandas as pd
    import torch
    torch.set_num_threads(a.threads)
    from echocare_clip.config import load_config
    from echocare_clip.data import build_manifest
    from echocare_clip.models import build_model
    from echocare_clip import evaluate as ev
    from echocare_clip.train import train
    sys.path.insert(0, str(HERE))
    from train_throughput import machine, record

    work = (HERE / '_work' / 'scaling').resolve(); work.mkdir(parents=True, exist_ok=True)
    print(f'{machine()}\nlevel {a.level}, {a.size} px, {a.epochs} epochs, {a.bootstrap} bootstrap resamples, {a.threads} threads')
    rows_out = []
    for n in a.n:
        cfg = load_config(overrides=[
            'data.datasets=[phantom]', 'data.heldout=[]', f'data.phantom_n={n}', f'data.phantom_size={a.size}',
            f'data.image_size={a.size}', f'data.augment={"false" if a.level == "heads" else "true"}',
            f'data.cache_dir={work / "cache"}', f'model.finetune={a.level}', f'train.epochs={a.epochs}',
            'train.patience=0', 'train.collapse_patience=0', 'train.save_checkpoints=false', f'train.threads={a.threads}',
            'train.device=cpu', f'eval.bootstrap={a.bootstrap}', f'output.root={work / "runs"}', 'output.overwrite=true'])
        load0 = os.getloadavg()[0]
        t = time.perf_counter(); manifest, _ = build_manifest(cfg); t_data = time.perf_counter() - t
        shutil.rmtree(work / 'cache' / 'features', ignore_errors=True)
        run = work / 'runs' / f'n{n}'
        t = time.perf_counter(); train(cfg, run_dir=run); t_train = time.perf_counter() - t
        hist = pd.read_csv(run / 'history.csv')
        epochs = hist[hist['epoch'] >= 1]
        log = (run / 'train.log').read_text()
        cache_s = sum(float(x) for x in re.findall(r'computed in ([\d.]+) s', log))
        n_train = int((manifest['split'] == 'train').sum())
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        rows = manifest.assign(split='heldout')
        texts = ev.eval_captions(rows, cfg)
        shutil.rmtree(work / 'cache' / 'embeddings', ignore_errors=True)  # same seed, same weights: no stale hit
        t = time.perf_counter(); ev.extract_embeddings(model, rows, cfg, texts); t_embed = time.perf_counter() - t
        t = time.perf_counter(); metrics, _ = ev.evaluate_rows(model, rows, cfg, 'phantom', texts=texts); t_metrics = time.perf_counter() - t
        load1 = os.getloadavg()[0]
        batch = cfg.train.batch_size
        loop_s = (n_train // batch) * batch / float(epochs['pairs_per_s'].median())  # the optimiser steps alone
        r = dict(n=n, train_pairs=n_train, data_s=t_data, cache_s=cache_s, epoch_s=float(epochs['seconds'].median()), loop_s=loop_s,
                 pairs_per_s=float(epochs['pairs_per_s'].median()), train_total_s=t_train, embed_s=t_embed,
                 metrics_s=t_metrics, n_metrics=len(metrics), load=(load0, load1))
        rows_out.append(r)
        print(f'N={n:5d}: manifest (+ phantom generation) {t_data:6.1f} s | train {t_train:6.1f} s (feature caches {cache_s:.1f} s, '
              f'epoch {r["epoch_s"]:.1f} s, {r["pairs_per_s"]:.0f} pairs/s) | embeddings {t_embed:.1f} s | '
              f'metrics {t_metrics:.1f} s ({len(metrics)}) | load {load0:.1f}-{load1:.1f}', flush=True)
    md = ['| N images | train pairs | feature caches s | s / epoch | of which steps s | steps s per 1k train pairs | '
          'of which validation s | train() total s | embeddings s | embeddings s per 1k | metric suite s | metric suite s per 1k | load avg |',
          '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows_out:
        md.append(f'| {r["n"]} | {r["train_pairs"]} | {r["cache_s"]:.1f} | {r["epoch_s"]:.1f} | {r["loop_s"]:.1f} | '
                  f'{1000 * r["loop_s"] / r["train_pairs"]:.1f} | {r["epoch_s"] - r["loop_s"]:.1f} | '
                  f'{r["train_total_s"]:.1f} | {r["embed_s"]:.1f} | {1000 * r["embed_s"] / r["n"]:.1f} | {r["metrics_s"]:.1f} | '
                  f'{1000 * r["metrics_s"] / r["n"]:.1f} | {r["load"][0]:.1f}-{r["load"][1]:.1f} |')
    md = '\n'.join(md)
    print('\n' + md)
    if a.record:
        cmd = 'python bench/scaling.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
        record(f'Command: `{cmd}`  \nMachine: {machine()}  \n{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; '
               f'level {a.level}, {a.size} px, tiny-vit + tiny-clip-text, {a.epochs} epochs, {a.bootstrap} resamples\n\n{md}',
               f'scaling-{a.level}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
