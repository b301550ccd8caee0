"""Where one training step goes: ours (`train.optimizer_step`) vs open_clip's on the same model, batch and threads.

Not a test. Usage: python bench/profile_step.py [--level full] [--steps 4] [--threads 2] [--batch 64] [--top 12]

In one process, on one batch of 64 real images (the reference CSV's first rows, our augmentation) and their captions:
1. median seconds per step, alternating: ours as `train()` runs it (CPU deterministic mode without NaN-filling new
   tensors, fused AdamW), ours before those two fixes, and open_clip_train's step (`model(images, texts)`, its
   `ClipLoss`, backward, AdamW; no clipping);
2. the input side: building the batch (decode / cache + augmentation + tokenisation) each way;
3. `torch.profiler`: the top operators of one step of each variant, side by side (self CPU seconds and calls);
4. `cProfile`: the top Python functions of one of our steps by cumulative time (trainer overhead shows here).
"""
import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--level', default='full', choices=['heads', 'image', 'text', 'full'])
    p.add_argument('--steps', type=int, default=4, help='timed steps per variant (after one warm-up step)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--top', type=int, default=12)
    a = p.parse_args(argv)
    for v in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'): os.environ[v] = str(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    import open_clip
    from open_clip.loss import ClipLoss as OCClipLoss
    from PIL import Image
    import train_throughput as tt
    import echocare_clip.train as tr
    from echocare_clip.config import load_config
    from echocare_clip.data import build_manifest, ImageDataset
    from echocare_clip.loss import ClipLoss
    from echocare_clip.models import build_model

    work = Path(HERE / '_work' / 'train_throughput').resolve(); work.mkdir(parents=True, exist_ok=True)
    tt.reference_csv(tt.SHARED_DATA, work / 'train.csv')
    cfg = load_config(overrides=tt.ours_overrides(a.level, 1, a.threads, 0, a.batch, work / 'cache', work))
    manifest, _ = build_manifest(cfg)
    rows = manifest.iloc[:a.batch].reset_index(drop=True)
    captions = [f'{r.organ} ultrasound, {r.label}. {r.report[:200]}' for r in rows.itertuples()]
    print(f'{tt.machine()}; load average {os.getloadavg()[0]:.1f}; level {a.level}, batch {a.batch}, {a.threads} threads')

    # --- input side
    ds = ImageDataset(rows, cfg.data, train=True, seed=0)
    for i in range(len(ds)): ds.square(i)  # warm decode cache, as after the first epoch
    t = time.perf_counter(); images = torch.stack([ds[i][0] for i in range(len(ds))]); t_ours_img = time.perf_counter() - t
    torch.manual_seed(0)
    ours = build_model(cfg.model)
    ours.set_normalization([0.2] * 3, [0.2] * 3)
    t = time.perf_counter(); tokens = ours.tokenize(captions); t_ours_tok = time.perf_counter() - t
    oc = open_clip.create_model('EchoTiny-ViT-4L-256', output_dict=True)
    pre = open_clip.image_transform(128, is_train=True)
    tok = open_clip.get_tokenizer('EchoTiny-ViT-4L-256')
    t = time.perf_counter()
    oc_images = torch.stack([pre(Image.open(pth)) for pth in rows['image_path']]); t_oc_img = time.perf_counter() - t
    t = time.perf_counter(); oc_tokens = tok(captions); t_oc_tok = time.perf_counter() - t
    print(f'\ninput side for {a.batch} pairs: ours {t_ours_img:.3f} s images (cache + augmentation) + {t_ours_tok:.3f} s tokens; '
          f'open_clip {t_oc_img:.3f} s images (PNG decode + RandomResizedCrop) + {t_oc_tok:.3f} s tokens')

    # --- compute side
    if a.level == 'heads': oc.lock_image_tower(); oc.lock_text_tower(freeze_layer_norm=True)
    elif a.level == 'image': oc.lock_text_tower(freeze_layer_norm=True)
    elif a.level == 'text': oc.lock_image_tower()
    oc.train()
    params = [q for q in oc.parameters() if q.requires_grad]
    decay = [q for n, q in oc.named_parameters() if q.requires_grad and not (q.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n)]
    no_decay = [q for q in params if all(q is not d for d in decay)]
    oc_opt = torch.optim.AdamW([{'params': no_decay, 'weight_decay': 0.}, {'params': decay, 'weight_decay': 0.2}],
                               lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    oc_loss = OCClipLoss()

    def oc_step():
        oc_opt.zero_grad(set_to_none=True)
        out = oc(oc_images, oc_tokens)
        loss = oc_loss(out['image_features'], out['text_features'], out['logit_scale'])
        loss.backward(); oc_opt.step()

    groups = tr.param_groups(ours, cfg.train)
    ours_params = [q for g in groups for q in g['params']]
    opt_fused = torch.optim.AdamW(groups, fused=True)  # as train() builds it
    opt_loop = torch.optim.AdamW(tr.param_groups(ours, cfg.train))  # before: torch's per-parameter loop
    loss_fn = ClipLoss(dedup=cfg.train.loss == 'dedup')
    keys = tr.dup_codes(captions) if cfg.train.loss == 'dedup' else None
    info = tr.DistInfo()
    ours.train()

    def ours_step(opt):
        tr.optimizer_step(ours, loss_fn, [(images, tokens, keys)], opt, ours_params, info, cfg.train)

    def ours_now():  # what train() sets on CPU now
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        ours_step(opt_fused)

    def ours_before():  # deterministic mode NaN-filling every new tensor, unfused AdamW
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        ours_step(opt_loop)

    variants = {'ours, as train() runs it': ours_now, 'ours before the fixes': ours_before, 'open_clip_train step': oc_step}
    times = {k: [] for k in variants}
    for fn in variants.values(): fn()  # warm-up (allocator, AdamW state)
    for _ in range(a.steps):
        for k, fn in variants.items():
            torch.use_deterministic_algorithms(False)
            t = time.perf_counter(); fn(); times[k].append(time.perf_counter() - t)
    torch.use_deterministic_algorithms(False)
    print(f'\nseconds per step (median of {a.steps}, alternating):')
    ref = statistics.median(times['open_clip_train step'])
    for k, v in times.items():
        m = statistics.median(v)
        print(f'  {k:<34} {m:6.3f} s   {a.batch / m:6.1f} pairs/s   {ref / m:5.2f}x open_clip')

    # --- operator profile: one step of each variant, operators side by side
    from torch.profiler import profile, ProfilerActivity
    ops = {}
    for k, fn in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof: fn()
        torch.use_deterministic_algorithms(False)
        ops[k] = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    names = list(variants)
    first = sorted(ops[names[0]], key=lambda n: -ops[names[0]][n][0])[:a.top]
    print(f'\ntorch.profiler, one step each: top {a.top} operators of ours by self CPU seconds (calls)')
    print(f'  {"operator":<48}' + ''.join(f'{k[:26]:>30}' for k in names))
    for op in first:
        cells = [ops[k].get(op, (0.0, 0)) for k in names]
        print(f'  {op[:48]:<48}' + ''.join(f'{f"{t:.3f} s ({c})":>30}' for t, c in cells))
    print(f'  {"total self CPU":<48}' + ''.join(f'{f"{sum(t for t, _ in ops[k].values()):.3f} s":>30}' for k in names))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    pr = cProfile.Profile(); pr.enable(); ours_step(opt_fused); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats('cumulative').print_stats(a.top)
    print(f'cProfile, one step of ours (top {a.top} by cumulative time):')
    print('\n'.join(l for l in s.getvalue().splitlines() if l.strip())[:6000])
    torch.use_deterministic_algorithms(False); torch.utils.deterministic.fill_uninitialized_memory = True
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
