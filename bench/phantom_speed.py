"""Phantom generation speed: images/s for a fresh corpus (cold) and for reusing it (warm).

Usage: python bench/phantom_speed.py [--n 2000] [--size 128] [--workers 1 2]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

from echocare_clip.phantom import make_phantom


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=2000, help='images per corpus')
    ap.add_argument('--size', type=int, default=128, help='image side, pixels')
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='worker counts to time')
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'phantom speed: n={args.n} size={args.size} cpus={os.cpu_count()} load(1 min)={load:.1f}')
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            out = Path(tmp) / f'w{w}'
            t0 = time.perf_counter(); make_phantom(out, args.n, args.size, args.seed, workers=w); cold = time.perf_counter() - t0
            t0 = time.perf_counter(); make_phantom(out, args.n, args.size, args.seed, workers=w); warm = time.perf_counter() - t0
            print(f'workers={w}: cold {cold:6.1f} s ({args.n / cold:6.0f} images/s)   warm (reuse) {warm:5.2f} s')


if __name__ == '__main__':
    main()
