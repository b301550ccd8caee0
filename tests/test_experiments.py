"""Integration: grids and params, the paper study's fast failure, one experiment through papermill, the comparison
report, and the docs site."""
import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from echocare_clip.experiments import (KERNEL, _fake_run, _m, expand_params, load_study, render_comparison, run_config,
                                       write_grid)

ROOT = Path(__file__).resolve().parent.parent
GRIDS = sorted(ROOT.glob('params/*/grid.yaml'))


def _cli(*args, timeout=300):
    code = 'import sys; from echocare_clip.cli import main; sys.exit(main(sys.argv[1:]))'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    return subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _kernel_ready() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager
    return KERNEL in KernelSpecManager().find_kernel_specs()


needs_kernel = pytest.mark.skipif(not _kernel_ready(), reason=f'Jupyter kernel {KERNEL!r} not registered (make install)')


@pytest.mark.parametrize('grid', GRIDS, ids=[g.parent.name for g in GRIDS])
def test_generated_configs_up_to_date(grid):
    stale = [f'{p.name}: {s}' for p, s in write_grid(grid) if s != 'ok']
    assert not stale, f'run `echocare-clip grid {grid.relative_to(ROOT)} --write`: {stale}'


def test_study_sizes():
    sizes = {g.parent.name: len(expand_params([g])) for g in GRIDS}
    assert sizes == {'demo': 16, 'paper': 18, 'shared': 16}, sizes


def test_every_config_validates():
    r = _cli('config', 'validate', *sorted(glob.glob(str(ROOT / 'params/*.yaml')) + glob.glob(str(ROOT / 'params/*/*.yaml'))))
    assert r.returncode == 0, r.stderr


def test_paper_study_fails_fast_on_missing_weights(tmp_path):
    from echocare_clip.experiments import _zoo
    if all(avail for avail, _ in _zoo().values()): pytest.skip('every zoo weight is available here')
    t0 = time.time()
    r = _cli('run', *sorted(glob.glob(str(ROOT / 'params/paper/*.yaml'))), '--out', str(tmp_path), timeout=120)
    took = time.time() - t0
    lines = [l for l in r.stderr.splitlines() if l.startswith('echocare-clip run: ')]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 18 and all('missing weights for' in l for l in lines), r.stderr
    assert {Path(l.split(': ')[1]).stem for l in lines} == {p.stem for p in expand_params([ROOT / 'params/paper/grid.yaml'])}
    assert took < 60, f'took {took:.0f} s'  # no kernel, no data: a pre-flight check only
    assert not any(tmp_path.iterdir())  # nothing written


def _check_metric(name, rec):
    "Schema for every record; ranges for bounded measures; the point inside its CI where the sample is not tiny."
    assert set(rec) >= {'value', 'ci_low', 'ci_high', 'n'}, (name, rec)
    v, lo, hi = rec['value'], rec['ci_low'], rec['ci_high']
    if v is None: return
    assert math.isfinite(v), (name, rec)
    last = name.rsplit('/', 1)[-1]
    if last in ('accuracy', 'balanced_accuracy', 'macro_f1', 'auroc', 'pairwise_auc', 'ece') or '_R@' in last:
        assert -1e-6 <= v <= 1 + 1e-6, (name, rec)
        if lo is not None and hi is not None: assert -1e-6 <= lo <= hi <= 1 + 1e-6, (name, rec)
    if last in ('accuracy', 'balanced_accuracy') and lo is not None and rec['n'] >= 30:
        assert lo - 0.02 <= v <= hi + 0.02, (name, rec)


@needs_kernel
@pytest.mark.timeout(900)
def test_experiment_notebook_smoke(tmp_path):
    "The experiment notebook on the smoke configuration: finishes, writes its report and a sane metrics.json."
    rec = run_config(ROOT / 'params/smoke.yaml', overrides=[f'output.root={tmp_path}'])
    run_dir = Path(rec['run_dir'])
    assert rec['status'] == 'ok', f"{rec.get('error')} (log: {run_dir / 'run.log'})"
    for f in ('experiment.ipynb', 'report.html', 'run.log', 'status.json', 'metrics.json', 'history.csv', 'config.yaml'):
        assert (run_dir / f).exists(), f
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    for name, m in metrics.items(): _check_metric(name, m)
    splits = {n.split('/')[0] for n in metrics}
    assert {'val', 'test', 'heldout'} <= splits, sorted(metrics)[:20]
    assert any(n.startswith('heldout/phantom_shifted/') and 'zeroshot' in n for n in metrics), sorted(metrics)[:20]
    assert any(n.startswith('val/') and n.endswith('balanced_accuracy') for n in metrics), 'validation metrics select the model'
    report = (run_dir / 'report.html').read_text()
    assert 'data:image/png;base64' in report  # figures are embedded
    assert 'load_config(' not in report  # code is hidden
    again = run_config(ROOT / 'params/smoke.yaml', overrides=[f'output.root={tmp_path}'])
    assert again.get('cached') is True  # idempotent


@needs_kernel
@pytest.mark.timeout(300)
def test_comparison_report(tmp_path):
    study = tmp_path / 'toy'
    for name, val, ho in [('a-heads', 0.6, 0.5), ('b-full', 0.8, 0.45)]:
        _fake_run(study, name, {'val/zeroshot/balanced_accuracy': _m(val),
                                'heldout/x/zeroshot/balanced_accuracy': _m(ho, chance=1 / 3)})
    _fake_run(study, 'c-text', {}, status='failed', error='RuntimeError: loss is nan at step 3')
    index = render_comparison(study)
    page = index.read_text()
    assert 'RuntimeError: loss is nan at step 3' in page and 'b-full (selected)' in page
    assert 'data:image/png;base64' in page
    runs, metrics = load_study(study)
    assert len(runs) == 3 and (study / 'comparison.csv').exists()


def test_docs_site(tmp_path):
    from echocare_clip.docsite import build_site, notebooks
    site = build_site(ROOT / 'nbs', tmp_path / 'site', execute=False, log=lambda *_: None)
    pages = {p.name for p in site.glob('*.html')}
    expected = {'index.html'} | {p.with_suffix('.html').name for p in notebooks(ROOT / 'nbs') if p.name != 'index.ipynb'}
    assert expected <= pages, expected - pages
    exp = (site / '09_experiments.html').read_text()
    assert 'API: <code>echocare_clip.experiments</code>' in exp and 'def run_config(' in exp
    assert all('href="09_experiments.html"' in (site / p).read_text() for p in expected)  # every page has the sidebar
