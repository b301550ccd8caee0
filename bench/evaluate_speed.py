"""Seconds of the full evaluation metric suite on a BUSI-sized set of synthetic embeddings (target: < 60 s on 2 cores).

Not a test. Usage: python bench/evaluate_speed.py [--n 780] [--bootstrap 1000] [--dim 256] [--threads 2]
The set (`evaluate.synthetic_eval_set`) has 780 test images in BUSI's class proportions, a 600/150 train/val split for
the probes, ten caption templates per class (so captions repeat, as in the original study), and five prompts per
class. Each component is timed on its own, then the whole `metric_suite` (what `echocare-clip evaluate` runs after
the embeddings are extracted) end to end.
"""
import argparse
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=780, help='test images')
    p.add_argument('--bootstrap', type=int, default=1000, help='resamples per CI')
    p.add_argument('--dim', type=int, default=256, help='embedding size')
    p.add_argument('--threads', type=int, default=2, help='BLAS / torch threads')
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
    return 0 if full < 60 else 1


if __name__ == '__main__':
    raise SystemExit(main())
