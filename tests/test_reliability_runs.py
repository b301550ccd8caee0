"""Reliability and security, part 2: whole runs.

* Offline guarantee: train + evaluate through `echocare-clip` in a fresh interpreter whose sockets refuse (and log)
  every non-loopback connection and DNS lookup, with HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE unset: zero attempts.
* Determinism: the same configuration and seed give byte-identical `metrics.json` files and weights, in this process
  and in a fresh one.
* Crash safety: a run SIGKILLed between the two renames that swap a checkpoint into place, resumed with `--resume
  latest`, SIGKILLed again in the middle of an epoch and resumed again ends with the weights and metrics of the
  uninterrupted run; a run whose files hit the file-size limit (a full disk, as the kernel reports it) stops with one
  line and leaves no half-written file; a killed `echocare-clip run` grid resumes with finished configurations skipped
  and its Jupyter kernel gone.
* Security: a training run with LLM captions (loopback OpenAI-compatible server) never writes the API key anywhere.

test_train_resume.py (the training engineer's) kills `python -m echocare_clip.train` at a random point after the first
checkpoint and compares weights; this file kills at chosen points, through the dispatcher, and compares metrics too.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / 'params' / 'smoke.yaml'
TINY = ['data.phantom_n=48', 'data.phantom_heldout_n=24', 'data.phantom_size=32', 'data.image_size=32', 'train.epochs=3',
        'train.batch_size=16', 'train.threads=1', 'train.collapse_patience=0', 'model.text_max_length=16',
        'eval.bootstrap=100', 'eval.fewshot_k=[1]', 'eval.fewshot_seeds=1']

# ------------------------------------------------------------------------------------------------ network guard
# Installed as sitecustomize.py in every interpreter a guarded test starts (runner, Jupyter kernel, training):
# a connection or DNS lookup to anything but loopback is refused and logged (JSON lines) to $ECHOCARE_NET_LOG.
GUARD = r'''
import json, os, socket, traceback
_LOG = os.environ.get('ECHOCARE_NET_LOG')
_LOCAL = {'localhost', 'localhost.localdomain', 'ip6-localhost', socket.gethostname(), '', None}
def _local(host):
    host = host.decode() if isinstance(host, bytes) else host
    return host in _LOCAL or str(host).startswith('127.') or host in ('::1', '0.0.0.0', '::')
def _log(kind, target):
    if _LOG:
        with open(_LOG, 'a') as f:
            f.write(json.dumps({'pid': os.getpid(), 'kind': kind, 'target': str(target),
                                'stack': ''.join(traceback.format_stack(limit=12)[:-2])}) + '\n')
def _inet(sock): return sock.family in (socket.AF_INET, socket.AF_INET6)
_connect, _connect_ex, _sendto, _gai = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto, socket.getaddrinfo
def connect(self, address):
    if _inet(self) and not _local(address[0]):
        _log('connect', address); raise OSError(101, 'network blocked by the offline guard')
    return _connect(self, address)
def connect_ex(self, address):
    if _inet(self) and not _local(address[0]):
        _log('connect_ex', address); return 101
    return _connect_ex(self, address)
def sendto(self, data, *args):
    address = args[-1]
    if _inet(self) and isinstance(address, tuple) and not _local(address[0]):
        _log('sendto', address); raise OSError(101, 'network blocked by the offline guard')
    return _sendto(self, data, *args)
def getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        _log('getaddrinfo', host); raise socket.gaierror(socket.EAI_NONAME, 'DNS blocked by the offline guard')
    return _gai(host, *args, **kwargs)
socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto, socket.getaddrinfo = connect, connect_ex, sendto, getaddrinfo
'''

# Runs `echocare-clip` commands in sequence in one interpreter (argv: JSON list of argument lists). With
# $ECHOCARE_TEST_KILL = 'step:N' it SIGKILLs itself before the N-th optimiser step of this process; with 'swap:N',
# right after the N-th time a `last` checkpoint was moved aside (`.last.old`) and before its replacement moves in.
WRAPPER = r'''
import json, os, signal, sys
def die():
    sys.stdout.flush(); sys.stderr.flush(); os.kill(os.getpid(), signal.SIGKILL)
kind, _, n = os.environ.get('ECHOCARE_TEST_KILL', ':0').partition(':')
n, count = int(n or 0), [0]
if kind == 'step':
    import echocare_clip.train as T
    real_step = T.optimizer_step
    def optimizer_step(*a, **k):
        count[0] += 1
        if count[0] == n: die()
        return real_step(*a, **k)
    T.optimizer_step = optimizer_step
elif kind == 'swap':
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        out = real_replace(src, dst, *a, **k)
        if str(dst).endswith('/.last.old'):
            count[0] += 1
            if count[0] == n: die()
        return out
    os.replace = replace
from echocare_clip.cli import main
for argv in json.loads(sys.argv[1]):
    rc = main(argv)
    if rc: sys.exit(rc)
'''


def guarded_env(tmp: Path, log: Path, **extra) -> dict:
    "Environment of a guarded interpreter: the guard first on PYTHONPATH, hub offline flags removed, no stray threads."
    site = tmp / 'guard-site'
    site.mkdir(exist_ok=True)
    (site / 'sitecustomize.py').write_text(GUARD)
    env = {k: v for k, v in os.environ.items() if k not in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'PYTHONPATH')}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), ECHOCARE_NET_LOG=str(log), PYTHONHASHSEED='0',
               TOKENIZERS_PARALLELISM='false', MPLBACKEND='Agg', **{k: str(v) for k, v in extra.items()})
    return env


def attempts(log: Path) -> list[dict]:
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []


def run_cli(tmp: Path, log: Path, commands: list[list], kill: str = '', preexec=None, timeout: int = 600):
    "Run `echocare-clip` commands in one guarded interpreter; returns the CompletedProcess."
    env = guarded_env(tmp, log, ECHOCARE_TEST_KILL=kill)
    return subprocess.run([sys.executable, '-c', WRAPPER, json.dumps([[str(a) for a in c] for c in commands])], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


def train_cmd(tmp: Path, out: str, *extra) -> list:
    return ['train', '--config', SMOKE, '-o', *TINY, f'output.root={tmp / out}', f'data.cache_dir={tmp / "cache"}', *extra]


def eval_cmd(run: Path) -> list:
    return ['evaluate', '--run', run, '--no-figures']


def run_folder(tmp: Path, out: str) -> Path:
    found = list((tmp / out).glob('*/*/config.yaml'))
    assert len(found) == 1, found
    return found[0].parent


def outputs(run: Path) -> dict[str, bytes]:
    "The files that must not depend on how the run got there: metrics, predictions, final and best weights."
    files = sorted(run.glob('eval/*/metrics.json')) + sorted(run.glob('eval/*/predictions/*.csv'))
    files += [run / 'checkpoints' / c / 'model.safetensors' for c in ('best', 'last')]
    return {str(f.relative_to(run)): f.read_bytes() for f in files}


def assert_same_outputs(a: Path, b: Path):
    oa, ob = outputs(a), outputs(b)
    assert len(oa) >= 4 and oa.keys() == ob.keys(), (sorted(oa), sorted(ob))
    differ = [k for k in oa if oa[k] != ob[k]]
    assert not differ, f'{b} differs from {a} in {differ}'
    ha, hb = pd.read_csv(a / 'history.csv'), pd.read_csv(b / 'history.csv')
    cols = [c for c in ha.columns if c.startswith(('val/', 'train/')) or c in ('epoch', 'step')]
    pd.testing.assert_frame_equal(ha[cols], hb[cols])


def debris(folder: Path) -> list[str]:
    "Temporary files or folders of interrupted atomic writes."
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if '.tmp' in p.name)


# --------------------------------------------------------------------------------------------- the reference run
@pytest.fixture(scope='module')
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('reliability-runs')
    yield tmp
    for f in tmp.rglob('*.safetensors'): f.unlink()  # ~50 MB per checkpoint: do not keep them among pytest's tmp dirs


@pytest.fixture(scope='module')
def reference(work):
    "Uninterrupted train + evaluate through `echocare-clip`, in a guarded fresh interpreter: (run folder, network log)."
    from echocare_clip.config import load_config
    from echocare_clip.experiments import run_dir_for
    log = work / 'net-reference.jsonl'
    cmd = train_cmd(work, 'ref')
    run = run_dir_for(load_config(SMOKE, overrides=cmd[cmd.index('-o') + 1:]))
    r = run_cli(work, log, [cmd, eval_cmd(run)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert run_folder(work, 'ref') == run
    status = json.loads((run / 'train_status.json').read_text())
    assert status['status'] == 'completed' and status['epoch'] == 3, status
    return run, log


def test_guard_refuses_and_logs_non_loopback(tmp_path):
    "The guard itself: an outside connection and DNS lookup are refused and logged, loopback works."
    import socket
    log = tmp_path / 'net.jsonl'
    srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
    code = textwrap.dedent(f'''
        import socket
        socket.create_connection(('127.0.0.1', {srv.getsockname()[1]}), timeout=5).close()
        for target in (('example.org', 443), ('203.0.113.7', 80)):
            try: socket.create_connection(target, timeout=5); print('CONNECTED', target)
            except OSError: pass
        try: socket.socket().connect(('203.0.113.7', 80)); print('CONNECTED raw')
        except OSError: pass
    ''')
    r = subprocess.run([sys.executable, '-c', code], env=guarded_env(tmp_path, log), capture_output=True, text=True, timeout=60)
    srv.close()
    assert r.returncode == 0 and 'CONNECTED' not in r.stdout, r.stdout + r.stderr
    assert [(a['kind'], a['target']) for a in attempts(log)] == [('getaddrinfo', 'example.org'), ('getaddrinfo', '203.0.113.7'),
                                                                ('connect', "('203.0.113.7', 80)")]


def test_pipeline_makes_no_network_attempts(reference):
    "train + evaluate of the demo pipeline (tiny configuration): not a single non-loopback connection or lookup."
    run, log = reference
    made = attempts(log)
    assert not made, f'{len(made)} network attempts, first:\n{made[0]["kind"]} {made[0]["target"]}\n{made[0]["stack"]}'
    assert (run / 'eval' / 'test' / 'metrics.json').exists() and (run / 'eval' / 'phantom_shifted' / 'metrics.json').exists()


def test_same_config_and_seed_give_identical_metrics(reference, work):
    "The reference configuration again, in this process: byte-identical metrics.json, predictions and weights."
    from echocare_clip.config import load_config
    from echocare_clip.evaluate import evaluate_run
    from echocare_clip.train import train
    ref, _ = reference
    run = train(load_config(SMOKE, overrides=[*TINY, f'output.root={work / "again"}', f'data.cache_dir={work / "cache"}']))
    evaluate_run(run, figures=False)
    assert run.name == ref.name  # same configuration, same run name (the hash ignores output.root)
    assert_same_outputs(ref, run)
    metrics = json.loads((run / 'eval' / 'test' / 'metrics.json').read_text())
    assert len(metrics) > 50 and any(k.startswith('test/zeroshot/') and k.endswith('/balanced_accuracy') for k in metrics)


def test_sigkill_during_checkpoint_swap_and_mid_epoch_then_resume(reference, work):
    "Killed twice at the worst moments; `--resume latest` twice; the end is the uninterrupted run's, bit for bit."
    from echocare_clip.train import find_checkpoint
    ref, _ = reference
    log = work / 'net-killed.jsonl'
    steps = int(pd.read_csv(ref / 'history.csv').set_index('epoch').loc[1, 'step'])  # optimiser steps per epoch

    # 1. killed between moving `last` (epoch 1) aside and moving the finished epoch-2 checkpoint in
    r = run_cli(work, log, [train_cmd(work, 'cut')], kill='swap:1')
    assert r.returncode == -signal.SIGKILL, r.stdout[-1500:] + r.stderr[-1500:]
    run = run_folder(work, 'cut')
    ckpt = run / 'checkpoints'
    assert not (ckpt / 'last').exists() and (ckpt / '.last.old').is_dir()  # the moment between the two renames
    assert json.loads((find_checkpoint(ckpt / 'last') / 'training_state.json').read_text())['epoch'] == 1
    assert [d for d in debris(run) if d.startswith('checkpoints/.last.tmp-')]  # the epoch-2 folder that never moved in

    # 2. resumed from the checkpoint left aside (epoch 1), killed again before the first step of epoch 3
    r = run_cli(work, log, [train_cmd(work, 'cut', '--resume', 'latest')], kill=f'step:{steps + 1}')
    assert r.returncode == -signal.SIGKILL, r.stdout[-1500:] + r.stderr[-1500:]
    assert 'resumed from' in r.stdout and 'at epoch 1' in r.stdout, r.stdout[-1500:]
    state = json.loads((find_checkpoint(ckpt / 'last') / 'training_state.json').read_text())
    assert (state['epoch'], state['step']) == (2, 2 * steps)
    # the resume removed the killed save's temporary folder; the epoch-2 save replaced `.last.old` only once in place
    assert not debris(run) and not (ckpt / '.last.old').exists() and (ckpt / 'last').is_dir(), debris(run)

    # 3. resumed to the end, evaluated
    r = run_cli(work, log, [train_cmd(work, 'cut', '--resume', 'latest'), eval_cmd(run)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert 'at epoch 2' in r.stdout and 'epoch 3/3' in r.stdout, r.stdout[-1500:]
    assert json.loads((run / 'train_status.json').read_text())['status'] == 'completed'
    assert_same_outputs(ref, run)
    assert not attempts(log)


def test_resume_from_a_damaged_checkpoint_one_line(reference, work, capsys):
    "A checkpoint cut short (a full disk, a copy interrupted) is named in one line with the way out, not a traceback."
    import shutil
    from echocare_clip.cli import main
    ref, _ = reference
    run = work / 'damaged' / ref.name
    shutil.copytree(ref / 'checkpoints' / 'last', run / 'checkpoints' / 'last')
    shutil.copy(ref / 'config.yaml', run / 'config.yaml')
    (run / 'train_status.json').write_text(json.dumps({'status': 'running', 'epoch': 3}))  # as if killed before the end
    weights = run / 'checkpoints' / 'last' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    capsys.readouterr()
    rc = main(['train', '--resume', str(run)])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f'echocare-clip train: checkpoint {run}/checkpoints/last is damaged (model.safetensors: '), err
    assert err[0].endswith('start the run again with output.overwrite=true'), err


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_stops_with_one_line_and_no_partial_file(reference, work):
    "Writes cut short by the kernel (EFBIG, as ENOSPC on a full disk) inside a checkpoint: one line, nothing half-written."
    from echocare_clip.train import find_checkpoint
    log = work / 'net-full.jsonl'
    r = run_cli(work, log, [train_cmd(work, 'full')], preexec=_limit_file_size(4 * 2**20))  # weights are ~50 MB
    err = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(('epoch', '\r'))]
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith('echocare-clip train: ') and 'File too large' in err[0], err
    assert 'free disk space' in err[0]
    run = run_folder(work, 'full')
    assert f'{run}/checkpoints/best: File too large' in err[0], err  # the checkpoint is named (safetensors names no file)
    assert not debris(run), debris(run)
    for name in ('best', 'last'):  # a checkpoint folder is there complete or not at all
        assert find_checkpoint(run / 'checkpoints' / name) is None
    for f in run.rglob('*'):  # every file that is there reads back whole
        if f.suffix == '.json': json.loads(f.read_text())
        if f.suffix == '.csv': pd.read_csv(f)
    assert not attempts(log)


# ------------------------------------------------------------------------------------- the API key stays secret
KEY_ENV, KEY = 'ECHOCARE_RELIABILITY_KEY', 'sk-reliability-5f2c9e1d7a3b4c6e8f0a-not-real'


class _Chat(BaseHTTPRequestHandler):
    "An OpenAI-compatible endpoint that answers every prompt with three plausible captions."
    def do_POST(self):
        self.rfile.read(int(self.headers.get('Content-Length', 0)))
        self.server.auth.append(self.headers.get('Authorization'))
        caps = ['B-mode ultrasound image of the organ showing the finding described in the source caption, with '
                'grayscale speckle texture and no other abnormality stated.'] * 3
        body = json.dumps({'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': json.dumps(caps)}}]}).encode()
        self.send_response(200); self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)

    def log_message(self, *args): pass


def test_api_key_never_written(tmp_path, monkeypatch, capfd):
    "A training run with LLM captions: the key reaches the endpoint, and no file, log line or report contains it."
    from echocare_clip.cli import main
    srv = ThreadingHTTPServer(('127.0.0.1', 0), _Chat)
    srv.auth = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv('ECHOCARE_CACHE', str(tmp_path / 'llm-cache'))
    try:
        argv = ['train', '--config', SMOKE, '-o', *TINY, 'train.epochs=1', f'output.root={tmp_path / "out"}',
                f'data.cache_dir={tmp_path / "cache"}', 'captions.strategy=llm', 'captions.rewriter=openai',
                f'captions.llm_base_url=http://127.0.0.1:{srv.server_port}/v1', 'captions.llm_model=canned',
                f'captions.llm_api_key_env={KEY_ENV}', 'captions.llm_max_retries=0']
        assert main([str(a) for a in argv]) == 0
        run = run_folder(tmp_path, 'out')
        assert main(['evaluate', '--run', str(run), '--no-figures']) == 0
        assert main(['config', 'show', str(run / 'config.yaml')]) == 0
    finally:
        srv.shutdown(); srv.server_close()
    out, err = capfd.readouterr()
    assert srv.auth and set(srv.auth) == {f'Bearer {KEY}'}  # the key was used, so its absence below means something
    caps = pd.read_csv(run / 'captions.csv', keep_default_na=False)
    assert (caps['rewriter'] == 'openai:canned').any()
    # the rewrites are cached under data.cache_dir (where `echocare-clip captions build` keeps them), not $ECHOCARE_CACHE
    assert (tmp_path / 'cache' / 'llm_captions.jsonl').is_file() and not (tmp_path / 'llm-cache').exists()
    written = [p for p in tmp_path.rglob('*') if p.is_file()]
    assert len(written) > 20
    leaks = [str(p) for p in written if KEY.encode() in p.read_bytes()]
    leaks += [name for name, text in (('stdout', out), ('stderr', err)) if KEY in text]
    assert not leaks, f'the API key was written to {leaks}'
    assert KEY_ENV in (run / 'config.yaml').read_text()  # the variable's name is what the configuration keeps


# ------------------------------------------------------------------------------------------- killed grid runs
def _kernel_ready() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager
    from echocare_clip.experiments import KERNEL
    return KERNEL in KernelSpecManager().find_kernel_specs()


needs_kernel = pytest.mark.skipif(not _kernel_ready(), reason="Jupyter kernel 'echocare-clip' not registered (make install)")

# A stand-in for experiments/experiment.ipynb with the same contract (parameters `config`, `overrides`; writes the
# run folder and its metrics.json), that can be told to stop and wait at a stage, so a test can kill the runner there.
STUB_CELLS = ['''config = ''
overrides = []''', '''import json, os, time
from pathlib import Path
from echocare_clip.config import atomic_write_text, load_config, resolve_run_dir
cfg = load_config(config, overrides=list(overrides))
run_dir = resolve_run_dir(cfg)
def hold(stage):
    spec = Path(os.environ.get('ECHOCARE_TEST_HOLD', '/nonexistent'))
    if spec.exists() and f'{cfg.output.name}:{stage}' in spec.read_text().split():
        atomic_write_text(run_dir / f'holding-{stage}', str(os.getpid()))
        time.sleep(600)
atomic_write_text(run_dir / 'started', str(os.getpid()))
hold('before')
atomic_write_text(run_dir / 'metrics.json', json.dumps({'val/loss': {'value': 1.0, 'ci_low': None, 'ci_high': None, 'n': 1}}))
hold('after')''']

RUNNER = r'''
import json, sys
from echocare_clip.experiments import run_configs
records = run_configs(sys.argv[2:], template=sys.argv[1], compare=False, say=lambda line: print(line, flush=True))
print('RECORDS ' + json.dumps([{k: r.get(k) for k in ('name', 'status', 'cached', 'error')} for r in records]), flush=True)
'''


def _descendants(pid: int) -> set[int]:
    "Process ids below `pid` (from /proc)."
    children: dict[int, list[int]] = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try: fields = stat.read_text().rsplit(')', 1)[1].split()
        except (OSError, IndexError): continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []): out.add(c); todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try: state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError): return False
    return state not in ('Z', 'X')


class Grid:
    "Stub configurations `a`, `b` run by `run_configs` in a guarded subprocess that a test can kill at a chosen stage."
    def __init__(self, tmp: Path):
        import nbformat
        self.tmp, self.out, self.log, self.hold = tmp, tmp / 'out', tmp / 'net.jsonl', tmp / 'hold.txt'
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(STUB_CELLS[0], metadata={'tags': ['parameters']}),
                    nbformat.v4.new_code_cell(STUB_CELLS[1])]
        nb.metadata['kernelspec'] = {'name': 'echocare-clip', 'display_name': 'echocare-clip', 'language': 'python'}
        self.template = tmp / 'stub.ipynb'
        nbformat.write(nb, str(self.template))
        self.configs = []
        for name in 'ab':
            p = tmp / f'{name}.yaml'
            p.write_text(f'output:\n  root: {self.out}\n  study: grid\n  name: {name}\nmodel:\n  offline: false\n')
            self.configs.append(p)

    def run_dir(self, name: str) -> Path:
        found = list((self.out / 'grid').glob(f'{name}-*'))
        return found[0] if len(found) == 1 else self.out / 'grid' / f'{name}-missing'

    def start(self, hold: str = ''):
        self.hold.write_text(hold)
        env = guarded_env(self.tmp, self.log, ECHOCARE_TEST_HOLD=self.hold)
        return subprocess.Popen([sys.executable, '-c', RUNNER, str(self.template), *map(str, self.configs)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def kill_when(self, proc, marker: Path, timeout: float = 240) -> set[int]:
        "SIGKILL the runner once `marker` exists; returns the processes it had started (its kernel)."
        deadline = time.time() + timeout
        while not marker.exists():
            assert proc.poll() is None, f'the runner ended before {marker.name}:\n{proc.stdout.read()[-3000:]}'
            assert time.time() < deadline, f'{marker} never appeared'
            time.sleep(0.1)
        below = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return below

    def finish(self, proc, timeout: float = 300) -> list[dict]:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-3000:]
        return json.loads(next(l for l in out.splitlines() if l.startswith('RECORDS '))[8:])


def _wait_gone(pids: set[int], timeout: float = 20) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids): time.sleep(0.2)
    left = {p for p in pids if _alive(p)}
    for p in left:
        try: os.kill(p, signal.SIGKILL)  # do not leave a stray kernel behind, whatever the assertion says
        except ProcessLookupError: pass
    return left


def test_killed_grid_resumes_with_finished_configurations_skipped(tmp_path):
    g = Grid(tmp_path)
    proc = g.start(hold='b:before')
    deadline = time.time() + 240
    while not list((g.out / 'grid').glob('b-*/holding-before')):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, 'b never started'
        time.sleep(0.1)
    kernels = g.kill_when(proc, next((g.out / 'grid').glob('b-*/holding-before')))
    assert kernels, 'no kernel process was found under the runner'
    assert not _wait_gone(kernels), 'the Jupyter kernel outlived its killed runner'
    a, b = g.run_dir('a'), g.run_dir('b')
    a_status = (a / 'status.json').read_bytes()
    assert json.loads(a_status)['status'] == 'ok' and not (b / 'metrics.json').exists()

    records = g.finish(g.start())
    by = {r['name']: r for r in records}
    assert by['a']['status'] == 'ok' and by['a']['cached'] is True  # finished: skipped, not re-run
    assert (a / 'status.json').read_bytes() == a_status
    assert by['b']['status'] == 'ok' and not by['b'].get('cached')  # interrupted: run again, from a clean folder
    assert not (b / 'holding-before').exists() and (b / 'metrics.json').exists() and (b / 'report.html').exists()
    assert not list((g.out / 'grid' / '.running').glob('*')), 'staged notebooks left behind'
    assert not attempts(g.log)


def test_runner_killed_after_metrics_written_reruns(tmp_path):
    g = Grid(tmp_path)
    g.configs = g.configs[:1]
    proc = g.start(hold='a:after')
    deadline = time.time() + 240
    while not list((g.out / 'grid').glob('a-*/holding-after')):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, 'a never reached its metrics'
        time.sleep(0.1)
    kernels = g.kill_when(proc, next((g.out / 'grid').glob('a-*/holding-after')))
    assert not _wait_gone(kernels)
    assert (g.run_dir('a') / 'metrics.json').exists() and not (g.run_dir('a') / 'status.json').exists()
    by = {r['name']: r for r in g.finish(g.start())}
    assert by['a']['status'] == 'ok' and not by['a'].get('cached'), by['a']
    assert (g.run_dir('a') / 'status.json').exists() and (g.run_dir('a') / 'report.html').exists()


# ------------------------------------------------------------------------------------------ the real pipeline
@pytest.mark.slow
@needs_kernel
@pytest.mark.timeout(1800)
def test_demo_pipeline_grid_killed_and_resumed_offline(tmp_path):
    """`echocare-clip run` on two tiny configurations through the real experiment notebook, under the network guard
    (runner and kernels): killed while the second trains, rerun: the first is skipped, the second completes."""
    log = tmp_path / 'net.jsonl'
    configs = []
    for name, finetune in (('heads', 'heads'), ('full', 'full')):
        p = tmp_path / f'{name}.yaml'
        p.write_text(f'include: {SMOKE}\noutput:\n  study: g\n  name: {name}\nmodel:\n  finetune: {finetune}\n')
        configs.append(p)
    over = ['-o', *[o for o in TINY if not o.startswith('train.epochs')], 'train.epochs=2', f'data.cache_dir={tmp_path / "cache"}']
    cmd = [sys.executable, '-c', 'import sys; from echocare_clip.cli import main; sys.exit(main(sys.argv[1:]))', 'run',
           *map(str, configs), '--out', str(tmp_path / 'out'), '--no-compare', *over]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=guarded_env(tmp_path, log), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    study = tmp_path / 'out' / 'g'
    deadline = time.time() + 900
    while not list(study.glob('full-*/checkpoints/last/training_state.json')):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    kernels = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait(30)
    assert not _wait_gone(kernels)
    heads = next(study.glob('heads-*'))
    assert json.loads((heads / 'status.json').read_text())['status'] == 'ok'
    r = subprocess.run(cmd, cwd=ROOT, env=guarded_env(tmp_path, log), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'g/heads: ok (cached)' in r.stdout and 'g/full: ok' in r.stdout, r.stdout
    full = next(study.glob('full-*'))
    metrics = json.loads((full / 'metrics.json').read_text())
    assert any(k.startswith('heldout/phantom_shifted/') for k in metrics)
    made = attempts(log)
    assert not made, f'{len(made)} network attempts, first: {made[0]["kind"]} {made[0]["target"]}\n{made[0]["stack"]}'
    for f in tmp_path.rglob('*.safetensors'): f.unlink()
