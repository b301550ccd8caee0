"""Training throughput (pairs/s, peak RSS): our trainer vs open_clip_train on the same model, CSV, batch, threads and steps.

Not a test. Usage: python bench/train_throughput.py [--levels heads full] [--steps 5] [--runs 3] [--threads 2]
                   [--workers 1] [--cpus 0,1] [--batch 64] [--variants as-is] [--record [--tag NAME]]

Both sides train the configuration of `../shared/bench/EchoTiny-ViT-4L-256.json` (4-layer ViT, width 256, patch 16 at
128 px; 4-layer text transformer, width 256, context 77; embed 256) from random init, CPU fp32, on the 2,108 real pairs
of `../shared/bench/openclip_reference.sh` (lung, breast, thyroid): open_clip_train reads that tab-separated CSV; ours
reads the same images through the dataset registry (checked to be the same files) with its own captions. Levels map
to open_clip_train's locks: heads = `--lock-image --lock-text`, image = `--lock-text`, text = `--lock-image`,
full = none. `heads-noaug` is heads with `data.augment=false`, the only setting where both towers are cached.

Every run is a fresh process pinned with `taskset -c CPUS`, OMP/MKL threads and torch threads = `--threads`, the same
number of data-loader workers, and is stopped after `--steps` optimiser steps. Pairs/s = batch x (steps - 1) / time
of steps 2..N (step 1 carries the loader start), each step timed end to end (data + forward + loss + backward +
optimiser), as open_clip's `Batch (t)` is; CPU seconds per step (the main process's user + system time from /proc,
sampled by this script at each step line, both sides alike) give a second ratio that moves less with the load.
Start-up = process start to the end of step 1 (imports, data, model, frozen-tower caches, our epoch-0 validation). Peak RSS is the main process's (`wait4`). Runs alternate ours / open_clip so load drifts hit both;
the ratio is taken per pair of runs and its median reported. Our decode cache is warmed once beforehand (the cold
first epoch is what bench/data_loading.py measures); our feature caches are deleted before every run.
"""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_BENCH = REPO.parent / 'shared' / 'bench'
SHARED_DATA = REPO.parent / 'shared' / 'datasets'
MODEL = 'EchoTiny-ViT-4L-256'
LEVELS = ('heads', 'heads-noaug', 'image', 'text', 'full')
_LT = ['--lock-text', '--lock-text-freeze-layer-norm']  # open_clip's CLIP asserts the layer norms freeze too
LOCKS = {'heads': ['--lock-image', *_LT], 'heads-noaug': ['--lock-image', *_LT], 'image': _LT, 'text': ['--lock-image'],
         'full': []}
DATASETS = ('pocus_lung', 'breast_lesions_usg', 'ddti_thyroid')


def reference_csv(shared: Path, out: Path) -> int:
    "The tab-separated CSV of `openclip_reference.sh` (same rows, same captions), written to `out`; returns its rows."
    S, rows = str(shared), []
    for r in csv.DictReader(open(f'{S}/pocus_lung/labels.csv')):
        rows.append((f'{S}/pocus_lung/{r["path"]}', f'lung ultrasound, {r["label"]}. ' + (r['description'] or '')[:200]))
    for r in csv.DictReader(open(f'{S}/breast_lesions_usg/labels.csv')):
        rows.append((f'{S}/breast_lesions_usg/{r["path"]}', f'breast ultrasound, {r["label"]}. ' + r['findings_text'][:200]))
    for r in csv.DictReader(open(f'{S}/ddti_thyroid/labels.csv')):
        rows.append((f'{S}/ddti_thyroid/{r["path"]}', f'thyroid ultrasound, {r["label"]}'))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, 'w', newline='') as f:
        w = csv.writer(f, delimiter='\t'); w.writerow(['filepath', 'title'])
        for p, t in rows: w.writerow([p, t.replace('\t', ' ').replace('\n', ' ')])
    return len(rows)


def ours_overrides(level: str, steps: int, threads: int, workers: int, batch: int, cache: Path, out: Path) -> list[str]:
    "Config overrides of our side: the reference model, data and batch; one epoch stopped at `steps`."
    return [f'data.datasets=[{",".join(DATASETS)}]', 'data.heldout=[]', f'data.shared_root={SHARED_DATA}',
            f'data.cache_dir={cache}', 'data.image_size=128', 'data.split_ratios=[0.9,0.05,0.05]',
            f'data.augment={"false" if level == "heads-noaug" else "true"}',
            f'model.image_tower=open_clip:{MODEL}', f'model.text_tower=open_clip:{MODEL}', 'model.embed_dim=256',
            f'model.finetune={"heads" if level.startswith("heads") else level}',
            f'train.batch_size={batch}', 'train.epochs=1', f'train.max_steps={steps}', f'train.threads={threads}',
            f'train.num_workers={workers}', 'train.save_checkpoints=false', 'train.precision=fp32', 'train.device=cpu',
            f'output.root={out}', 'output.overwrite=true']


# ---------------------------------------------------------------- worker side (one process per run)
def _worker_ours(a) -> int:
    "Train with our trainer, printing `BENCH_STEP step_s since_start_s outside_s` after every optimiser step."
    t_start = time.perf_counter()
    import echocare_clip.train as tr
    from echocare_clip.config import load_config
    import open_clip
    open_clip.add_model_config(SHARED_BENCH / f'{MODEL}.json')
    inner, last = tr.optimizer_step, [None]

    def timed_step(*args, **kw):
        t_in = time.perf_counter()
        out = inner(*args, **kw)
        now = time.perf_counter()
        prev = last[0] if last[0] is not None else t_start
        last[0] = now
        # outside = time between two optimiser steps: data wait, tokenisation, loop bookkeeping (open_clip: `Data (t)`)
        print(f'BENCH_STEP {now - prev:.4f} {now - t_start:.3f} {t_in - prev:.4f}', flush=True)
        return out
    tr.optimizer_step = timed_step
    import torch
    if a.variant in ('nofill', 'fast'):  # proposed trainer fix 1: deterministic algorithms without NaN-filling new tensors
        torch.utils.deterministic.fill_uninitialized_memory = False
    if a.variant in ('fused', 'fast'):  # proposed trainer fix 2: the fused AdamW kernel (same update, one pass)
        import functools
        torch.optim.AdamW = functools.partial(torch.optim.AdamW, fused=True)
    cfg = load_config(overrides=ours_overrides(a.level, a.steps, a.threads, a.workers, a.batch, Path(a.cache), Path(a.out)))
    tr.train(cfg, run_dir=Path(a.out) / 'run')
    return 0


def _worker_openclip(a) -> int:
    "open_clip_train.main with the reference config registered (no change to site-packages)."
    import open_clip
    open_clip.add_model_config(SHARED_BENCH / f'{MODEL}.json')
    from open_clip_train.main import main
    main(a.rest)
    return 0


# ---------------------------------------------------------------- parent side
_OC_LINE = re.compile(r'Train Epoch: \d+ \[.*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)')
_OURS_LINE = re.compile(r'BENCH_STEP ([\d.]+) ([\d.]+) ([\d.]+)')


def _run(cmd: list[str], env: dict, steps: int, pattern, timeout: float, log: Path) -> dict:
    "Run `cmd` until `steps` step lines were seen; step seconds, start-up seconds, peak RSS (MB), wall seconds."
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1,
                         start_new_session=True, cwd=str(log.parent))
    times, outside, cpu, startup, lines = [], [], [], None, []
    try:
        for line in p.stdout:
            lines.append(line)
            m = pattern.search(line)
            if not m: continue
            cpu.append(_cpu_seconds(p.pid))
            times.append(float(m.group(2)) if pattern is _OC_LINE else float(m.group(1)))
            outside.append(float(m.group(1)) if pattern is _OC_LINE else float(m.group(3)))
            if startup is None: startup = time.perf_counter() - t0
            if len(times) >= steps: break
            if time.perf_counter() - t0 > timeout: break
    finally:
        wall = time.perf_counter() - t0
        if p.poll() is None:
            try: os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError: pass
        try: rss = os.wait4(p.pid, 0)[2].ru_maxrss / 1024
        except ChildProcessError: rss = float('nan')  # reaped elsewhere (the process was killed from outside)
        p.returncode = p.returncode if p.returncode is not None else -1
        p.stdout.close()
        try: os.killpg(p.pid, signal.SIGKILL)  # data-loader workers left behind
        except ProcessLookupError: pass
        log.write_text(''.join(lines))
    if len(times) < steps:
        raise RuntimeError(f'{cmd[2:4]}: {len(times)}/{steps} steps; see {log}')
    steady = times[1:] if len(times) > 1 else times
    return {'step_s': times, 'startup_s': startup, 'wall_s': wall, 'rss_mb': rss,
            'steady_step_s': sum(steady) / len(steady), 'steady_outside_s': sum(outside[1:]) / max(1, len(outside) - 1),
            'steady_cpu_step_s': (cpu[-1] - cpu[0]) / max(1, len(cpu) - 1)}


def _cpu_seconds(pid: int) -> float:
    "User + system CPU seconds of process `pid` so far (all its threads; not its children)."
    try: fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError: return float('nan')
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), TQDM_DISABLE='1', HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    return env


def _pin(cpus: str) -> list[str]:
    return ['taskset', '-c', cpus] if cpus and shutil.which('taskset') else []


def run_ours(a, level: str, work: Path, i: int, variant: str = 'as-is') -> dict:
    shutil.rmtree(work / 'cache' / 'features', ignore_errors=True)  # frozen-tower caches are part of the run's cost
    out = work / f'ours-{variant}-{level}-{i}'
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    cmd = [*_pin(a.cpus), sys.executable, str(Path(__file__).resolve()), '--worker', 'ours', '--level', level,
           '--steps', str(a.steps), '--threads', str(a.threads), '--workers', str(a.workers), '--batch', str(a.batch),
           '--cache', str(work / 'cache'), '--out', str(out), '--variant', variant]
    return _run(cmd, _env(a.threads), a.steps, _OURS_LINE, a.timeout, out / 'log.txt')


def run_openclip(a, level: str, work: Path, i: int) -> dict:
    out = work / f'openclip-{level}-{i}'
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    rest = ['--train-data', str(work / 'train.csv'), '--csv-img-key', 'filepath', '--csv-caption-key', 'title',
            '--csv-separator', '\t', '--model', MODEL, '--batch-size', str(a.batch), '--epochs', '1',
            '--workers', str(a.workers), '--device', 'cpu', '--precision', 'fp32', '--lr', '5e-4', '--warmup', '10',
            '--logs', str(out / 'logs'), '--name', 'run', '--log-every-n-steps', '1', '--save-frequency', '0',
            '--report-to', '', *LOCKS[level]]
    cmd = [*_pin(a.cpus), sys.executable, str(Path(__file__).resolve()), '--worker', 'openclip', '--', *rest]
    return _run(cmd, _env(a.threads), a.steps, _OC_LINE, a.timeout, out / 'log.txt')


def _same_images(work: Path) -> int:
    "Check that our manifest of the three datasets holds exactly the CSV's images; returns the count."
    from echocare_clip.config import load_config
    from echocare_clip.data import build_manifest
    cfg = load_config(overrides=ours_overrides('full', 1, 1, 0, 64, work / 'cache', work))
    manifest, _ = build_manifest(cfg)
    ours = set(map(str, manifest['image_path']))
    with open(work / 'train.csv') as f: theirs = {r['filepath'] for r in csv.DictReader(f, delimiter='\t')}
    theirs = {str(Path(p).resolve()) for p in theirs}
    ours = {str(Path(p).resolve()) for p in ours}
    if ours != theirs:
        raise SystemExit(f'image sets differ: {len(ours - theirs)} only ours, {len(theirs - ours)} only in the CSV')
    return len(ours)


def _warm_decode_cache(work: Path) -> float:
    "Decode every image once into our cache (what the first epoch of any run does); returns seconds."
    from echocare_clip.config import load_config
    from echocare_clip.data import build_manifest, warm_cache
    cfg = load_config(overrides=ours_overrides('full', 1, 1, 0, 64, work / 'cache', work))
    t = time.perf_counter()
    manifest, _ = build_manifest(cfg)
    warm_cache(manifest, cfg.data, workers=1)
    return time.perf_counter() - t


def machine() -> str:
    import platform
    import torch
    import open_clip
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    return (f'{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, '
            f'open_clip_torch {open_clip.__version__}')


def _med(xs): return statistics.median(xs) if xs else float('nan')


def table(results: dict, a) -> str:
    "Markdown table: per level and our variant, median pairs/s of each side, median per-pair ratio, start-up, peak RSS."
    lines = ['| level | ours | ours pairs/s | open_clip pairs/s | ratio (median of pairs) | ratio range | '
             'ratio of pairs per CPU-second | ours start-up s | '
             'open_clip start-up s | 10 epochs of 2,108 pairs, ratio (estimate) | ours peak RSS MB | open_clip peak RSS MB | load avg |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    ten = lambda x: x['startup_s'] + 10 * 2108 / a.batch * x['steady_step_s']  # start-up once, then steady steps
    for level, r in results.items():
        oc = [a.batch / x['steady_step_s'] for x in r['openclip']]
        for side in [k for k in r if k.startswith('ours')]:
            ours = [a.batch / x['steady_step_s'] for x in r[side]]
            ratios = [o / c for o, c in zip(ours, oc)]
            lines.append(f'| {level} | {side} | {_med(ours):.1f} | {_med(oc):.1f} | **{_med(ratios):.2f}x** | '
                         f'{min(ratios):.2f}-{max(ratios):.2f} | '
                         f'{_med([c["steady_cpu_step_s"] / o["steady_cpu_step_s"] for o, c in zip(r[side], r["openclip"])]):.2f}x | '
                         f'{_med([x["startup_s"] for x in r[side]]):.1f} | '
                         f'{_med([x["startup_s"] for x in r["openclip"]]):.1f} | '
                         f'{_med([ten(c) / ten(o) for o, c in zip(r[side], r["openclip"])]):.2f}x | {_med([x["rss_mb"] for x in r[side]]):.0f} | '
                         f'{_med([x["rss_mb"] for x in r["openclip"]]):.0f} | {r["load"][0]:.1f}-{r["load"][1]:.1f} |')
    return '\n'.join(lines)


def record(md: str, section: str, path: Path = HERE / 'RESULTS.md'):
    "Replace the `section` block of bench/RESULTS.md (between its markers) with `md`."
    begin, end = f'<!-- {section}:begin -->', f'<!-- {section}:end -->'
    text = path.read_text() if path.exists() else ''
    block = f'{begin}\n{md.strip()}\n{end}'
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else: text = text.rstrip() + f'\n\n{block}\n'
    tmp = path.with_suffix('.md.tmp'); tmp.write_text(text); os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--levels', nargs='+', default=['heads', 'full'], choices=LEVELS)
    p.add_argument('--steps', type=int, default=5, help='optimiser steps per run (>= 2; step 1 is not timed)')
    p.add_argument('--runs', type=int, default=3, help='runs per side and level (median reported)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--workers', type=int, default=1, help='data-loader workers, both sides')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--cpus', default='0,1', help="taskset CPU list ('' = no pinning)")
    p.add_argument('--timeout', type=float, default=900, help='seconds per run')
    p.add_argument('--work', default=str(HERE / '_work' / 'train_throughput'))
    p.add_argument('--record', action='store_true', help='write the table into bench/RESULTS.md')
    p.add_argument('--tag', default='', help='RESULTS.md section suffix, so several invocations can be recorded')
    p.add_argument('--variants', nargs='+', default=['as-is'], choices=['as-is', 'nofill', 'fused', 'fast'],
                   help='our trainer as it is, and/or with the proposed fixes: nofill = '
                        'torch.utils.deterministic.fill_uninitialized_memory=False, fused = AdamW(fused=True), fast = both')
    # worker mode (internal)
    p.add_argument('--worker', choices=['ours', 'openclip'], help=argparse.SUPPRESS)
    p.add_argument('--level', default='full', help=argparse.SUPPRESS)
    p.add_argument('--cache', help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    p.add_argument('--variant', default='as-is', help=argparse.SUPPRESS)
    p.add_argument('rest', nargs='*', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == 'ours': return _worker_ours(a)
    if a.worker == 'openclip': return _worker_openclip(a)
    if a.steps < 2: p.error('--steps must be >= 2 (the first step is not timed)')
    if not SHARED_DATA.is_dir(): raise SystemExit(f'{SHARED_DATA} not found; the benchmark needs the shared datasets')
    try: import open_clip_train.main  # noqa: F401
    except ImportError as e:
        raise SystemExit(f'open_clip_train is not importable ({e}); pip install braceexpand "webdataset<=0.2.86"')

    work = Path(a.work).resolve(); work.mkdir(parents=True, exist_ok=True)
    n = reference_csv(SHARED_DATA, work / 'train.csv')
    same = _same_images(work)
    warm = _warm_decode_cache(work)
    print(f'{machine()}\n{n} pairs in the reference CSV; our manifest holds the same {same} images; '
          f'decode cache warmed in {warm:.1f} s')
    print(f'model {MODEL}, batch {a.batch}, {a.steps} steps per run (first untimed), {a.runs} runs per side, '
          f'{a.threads} threads, {a.workers} loader worker(s), taskset -c {a.cpus or "(none)"}\n')
    results = {}
    sides = [(f'ours' if v == 'as-is' else f'ours+{v}', lambda a, l, w, i, v=v: run_ours(a, l, w, i, v)) for v in a.variants]
    sides.append(('openclip', run_openclip))
    for level in a.levels:
        r = results[level] = {name: [] for name, _ in sides}
        r['load'] = [os.getloadavg()[0]] * 2
        for i in range(a.runs):
            for side, fn in sides:
                load = os.getloadavg()[0]
                x = fn(a, level, work, i)
                x['load'] = load
                r[side].append(x)
                r['load'] = [min(r['load'][0], load), max(r['load'][1], load)]
                print(f'{level:<11} run {i + 1} {side:<12} {a.batch / x["steady_step_s"]:7.1f} pairs/s  '
                      f'({x["steady_step_s"]:.2f} s/step of which {x["steady_outside_s"]:.2f} s outside the optimiser step, '
                      f'{x["steady_cpu_step_s"]:.2f} CPU s/step, start-up {x["startup_s"]:.1f} s, '
                      f'peak RSS {x["rss_mb"]:.0f} MB, load {load:.1f})', flush=True)
    md = table(results, a)
    print('\n' + md)
    (work / 'results.json').write_text(json.dumps({'args': {k: v for k, v in vars(a).items() if k != 'rest'},
                                                   'machine': machine(), 'results': results}, indent=1))
    if a.record:
        cmd = 'python bench/train_throughput.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
        record(f'Command: `{cmd}`  \nMachine: {machine()}  \n{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}\n\n{md}',
               'train_throughput' + (f'-{a.tag}' if a.tag else ''))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
