"""Seconds of the full evaluation metric suite on a BUSI-sized set of synthetic embeddings (target: < 60 s on 2 cores).

Not a test. Usage: python bench/evaluate_speed.py [--n 780] [--bootstrap 1000] [--dim 256] [--threads 2]
The set (`evaluate.synthetic_eval_set`) has 780 test images in BUSI's class proportions, a 600/150 train/val split for
the probes, ten caption templates per class (so captions repeat, as in the original study), and five prompts per
class. Each component is timed on its own, then the whole `metric_suite` (what `echocare-clip evaluate` runs after
the embeddings are extracted) end to end.

Then the step before it, embedding extraction (`evaluate.extract_embeddings`), on `--n` real images of the shared corpus
(phantom images when it is absent) with a random-init model (`--model tiny`: the default tiny-vit + tiny-clip-text;
`reference`: EchoTiny-ViT-4L-256, the open_clip_train benchmark's model): images/s cold (PNG decode + squaring + cache
write), warm (decode cache), text embeddings/s, and a cache hit. `--no-embed` skips it. `--record` writes the tables
into bench/RESULTS.md.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=780, help='test images')
    p.add_argument('--bootstrap', type=int, default=1000, help='resamples per CI')
    p.add_argument('--dim', type=int, default=256, help='embedding size')
    p.add_argument('--threads', type=int, default=2, help='BLAS / torch threads')
    p.add_argument('--model', default='tiny', choices=['tiny', 'reference'], help='random-init model for the embedding part')
    p.add_argument('--batch', type=int, default=64, help='images per encoding batch')
    p.add_argument('--no-embed', action='store_true', help='skip the embedding-extraction part')
    p.add_argument('--record', action='store_true', help='write the tables into bench/RESULTS.md')
    a = p.parse_args(argv)
    for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'): os.environ[var] = str(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    from echocare_clip.config import Config
    from echocare_clip import evaluate as ev

    cfg = Config()
    cfg.eval.bootstrap = a.bootstrap
    rows, img, txt, prompts = ev.synthetic_eval_set(n_test=a.n, dim=a.dim)
    te = (rows['split'] == 'test').to_numpy()
    R, X, T = rows[te].reset_index(drop=True), img[te], txt[te]
    classes = list(prompts['breast'])
    timings = []

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        timings.append((name, time.perf_counter() - t, time.process_time() - c))
        return out

    W = timed('bootstrap weights (index matrix once)', lambda: ev.bootstrap_weights(len(R), a.bootstrap, cfg.seed, R['group_id']))
    timed('alignment + collapse flag', lambda: ev.alignment_metrics(X, T, W, cfg.eval.collapse_gap))
    keys = list(R['organ'] + ':' + R['label'])
    timed('retrieval: naive + dedup + label-aware', lambda: ev.retrieval_metrics(X, T, W, list(R['caption']), keys))
    probs = {}
    for ens in ('embedding', 'logit'):
        probs[ens] = ev.softmax(ev.zeroshot_logits(X, prompts['breast'], 50.0, ens))
        timed(f'zero-shot ({ens} ensemble) + calibration', lambda: ev.classification_metrics(R['label'], probs[ens], classes, W))
    tr, va, tt = ev.probe_splits(rows, img, te, cfg.seed)
    res = timed('linear probe (C swept on val)', lambda: ev.linear_probe(tr, va, tt, classes, cfg.eval.probe_C, cfg.seed))
    timed('linear probe metrics', lambda: ev.classification_metrics(tt.y, res['prob'], classes, W))
    timed(f'few-shot probes (k={cfg.eval.fewshot_k} x {cfg.eval.fewshot_seeds} seeds)',
          lambda: ev.fewshot_probe(tr, va, tt, classes, W, cfg.eval.fewshot_k, cfg.eval.fewshot_seeds, cfg.eval.probe_C, cfg.seed))
    timed('paired bootstrap test (two ensembles)', lambda: ev.compare_classifiers(R['label'], probs['embedding'], probs['logit'], classes, W))
    components = sum(t for _, t, _ in timings)
    metrics, _ = timed('FULL metric_suite end to end', lambda: ev.metric_suite(rows, img, cfg, 'test', txt, prompts, 50.0))

    width = max(len(n) for n, _, _ in timings)
    print(f'{len(R)} test images, {a.dim}-d embeddings, {a.bootstrap} resamples, {a.threads} threads; '
          f'load average {os.getloadavg()[0]:.1f} (wall time grows on a shared machine; CPU time does not)')
    print(f'{"step":<{width}}  wall s   CPU s')
    for name, t, c in timings: print(f'{name:<{width}}  {t:6.2f}  {c:6.2f}')
    print(f'{"sum of the components (without the full suite)":<{width}}  {components:6.2f}')
    full = timings[-1][1]
    print(f'full suite: {full:.1f} s for {len(metrics)} metrics ({"within" if full < 60 else "OVER"} the 60 s budget)')
    load = os.getloadavg()[0]
    md = [f'Metric suite on {len(R)} synthetic test images ({a.dim}-d, {a.bootstrap} resamples, {a.threads} threads, '
          f'load average {load:.1f}):', '', '| step | wall s | CPU s |', '|---|---|---|']
    md += [f'| {name} | {t:.2f} | {c:.2f} |' for name, t, c in timings]
    md.append(f'\nFull suite: **{full:.1f} s** for {len(metrics)} metrics (target < 60 s: {"met" if full < 60 else "NOT met"}).')
    if not a.no_embed:
        emb = embedding_speed(a)
        md += ['', emb]
        print('\n' + emb)
    if a.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_throughput import record, machine
        cmd = 'python bench/evaluate_speed.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
        record(f'Command: `{cmd}`  \nMachine: {machine()}  \n{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}\n\n'
               + '\n'.join(md), 'evaluate_speed')
    return 0 if full < 60 else 1


def _eval_rows(n: int, cache: Path):
    "`n` rows with captions: the shared corpus's lung, breast and thyroid images (seeded sample), else phantom images."
    from echocare_clip.config import load_config
    from echocare_clip.data import build_manifest, find_shared_root
    shared = find_shared_root()
    if shared:
        over = ['data.datasets=[pocus_lung,breast_lesions_usg,ddti_thyroid]', 'data.heldout=[]', f'data.shared_root={shared}']
    else:
        over = ['data.datasets=[phantom]', 'data.heldout=[]', f'data.phantom_n={n}']
    cfg = load_config(overrides=[*over, f'data.cache_dir={cache}', 'data.image_size=128'])
    manifest, _ = build_manifest(cfg)
    rows = manifest.sample(n=min(n, len(manifest)), random_state=0).reset_index(drop=True)
    texts = [f'{o} ultrasound, {l}. {r[:200]}' for o, l, r in zip(rows['organ'], rows['label'], rows['report'])]
    return rows, texts, cfg


def embedding_speed(a) -> str:
    "Images/s and texts/s of `extract_embeddings` (cold decode, warm cache, cached embeddings); a markdown table."
    import torch
    from echocare_clip import evaluate as ev
    from echocare_clip.models import build_model
    work = Path(__file__).resolve().parent / '_work'; work.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(dir=work, prefix='evaluate_speed-'))
    try:
        t = time.perf_counter()
        rows, texts, cfg = _eval_rows(a.n, cache)
        t_manifest = time.perf_counter() - t
        shutil.rmtree(cache / 'decoded', ignore_errors=True)  # the manifest's hashing pass leaves none, but be sure
        if a.model == 'reference':
            cfg.model.image_tower = cfg.model.text_tower = 'open_clip:EchoTiny-ViT-4L-256'
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        n, out = len(rows), []

        def timed(name, fn, count):
            t, c = time.perf_counter(), time.process_time()
            fn()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            out.append((name, count, dt, dc))

        timed('images, cold: decode + square + cache write + encode', lambda: ev.encode_images(model, rows, cfg, a.batch), n)
        timed('images, warm decode cache: encode', lambda: ev.encode_images(model, rows, cfg, a.batch), n)
        timed('images, warm: load + square only (no model)', lambda: [None for _ in ev.image_batches(rows, cfg, a.batch)], n)
        distinct = len(set(texts))
        timed(f'texts ({distinct} distinct of {n}): tokenise + encode', lambda: ev.encode_texts(model, texts), distinct)
        timed('extract_embeddings, first call (images + texts + cache write)', lambda: ev.extract_embeddings(model, rows, cfg, texts), n)
        timed('extract_embeddings, cached', lambda: ev.extract_embeddings(model, rows, cfg, texts), n)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    tower = 'EchoTiny-ViT-4L-256' if a.model == 'reference' else f'{cfg.model.image_tower} + {cfg.model.text_tower}'
    lines = [f'Embedding extraction: {n} images ({"phantom" if rows["dataset"].iloc[0] == "phantom" else "shared corpus"}, '
             f'{cfg.data.image_size} px), model {tower}, batch {a.batch}, {a.threads} threads, load average '
             f'{os.getloadavg()[0]:.1f}; manifest built in {t_manifest:.1f} s', '',
             '| step | items | wall s | CPU s | items/s (wall) |', '|---|---|---|---|---|']
    lines += [f'| {name} | {k} | {dt:.2f} | {dc:.2f} | {k / dt:.0f} |' for name, k, dt, dc in out]
    return '\n'.join(lines)


if __name__ == '__main__':
    raise SystemExit(main())
