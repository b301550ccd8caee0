"""Integration: `echocare-clip data summary` in a fresh process, on a fixture corpus and on the shared corpus."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from echocare_clip.data import find_shared_root, load_manifest

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=ROOT):
    code = 'import sys; from echocare_clip.cli import main; sys.exit(main(sys.argv[1:]))'
    return subprocess.run([sys.executable, '-c', code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _fixture(tmp: Path) -> Path:
    "A csv dataset of 40 distinct images in 20 patients with one truncated file, and its config."
    rng = np.random.default_rng(0)
    rows = []
    for k in range(40):
        img = Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8)).resize((80, 60), Image.BICUBIC)
        img.save(tmp / f'{k}.png')
        rows.append({'path': f'{k}.png', 'label': ['covid', 'regular'][k % 2], 'patient': k // 2, 'organ': 'lung'})
    (tmp / 'bad.png').write_bytes((tmp / '0.png').read_bytes()[:100])
    rows.append({'path': 'bad.png', 'label': 'covid', 'patient': 99, 'organ': 'lung'})
    pd.DataFrame(rows).to_csv(tmp / 'labels.csv', index=False)
    cfg = tmp / 'corpus.yaml'
    cfg.write_text(f"data:\n  datasets: ['csv:toy']\n  heldout: []\n  roots: {{toy: '{tmp}'}}\n  cache_dir: '{tmp / 'cache'}'\n")
    return cfg


def test_summary_on_fixture(tmp_path):
    cfg = _fixture(tmp_path)
    r = _cli('data', 'summary', '--config', str(cfg), '--save', str(tmp_path / 'run'))
    assert r.returncode == 0, r.stderr
    assert 'group crossings: 0' in r.stdout
    assert 'toy: corrupt 1' in r.stdout
    splits = load_manifest(tmp_path / 'run' / 'splits.csv')
    assert len(splits) == 40
    assert (splits.groupby('group_id').split.nunique() == 1).all()
    report = json.loads((tmp_path / 'run' / 'data_report.json').read_text())
    assert report['skipped'] == {'toy': {'corrupt': 1}}
    strict = _cli('data', 'summary', '--config', str(cfg), '-o', 'data.strict=true')
    assert strict.returncode == 2 and 'bad.png' in strict.stderr and len(strict.stderr.strip().splitlines()) == 1


def test_unknown_dataset_one_line():
    r = _cli('data', 'summary', '-o', 'data.datasets=[bus_brra]', 'data.heldout=[]')
    assert r.returncode == 2
    assert "did you mean 'bus_bra'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(find_shared_root() is None, reason='../shared/datasets not present')
def test_summary_on_shared_corpus(tmp_path):
    r = _cli('data', 'summary', '--config', 'params/shared/corpus.yaml', '--save', str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert 'group crossings: 0' in r.stdout and 'heldout:busi' in r.stdout
    splits = load_manifest(tmp_path / 'splits.csv')
    assert len(splits) == 3338
    assert set(splits[splits.dataset == 'busi'].split) == {'heldout'}
    assert (splits.groupby('group_id').split.nunique() == 1).all()
