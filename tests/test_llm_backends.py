"""Integration tests of the caption rewriters' model backends (echocare_clip.captions):

* a real OpenAI-compatible HTTP server on 127.0.0.1, started inside the test, serving canned chat completions: faithful
  ones for breast, label-flipping ones for thyroid (the drift the original study logged: a benign thyroid nodule
  became "normal thyroid", a thyroid caption gained "BI-RADS 2") that validation must reject; the second run must be
  served entirely from the JSONL cache; the API key must reach the server and nowhere else;
* a dead port and an endpoint that refuses the key: one clear line, nothing written;
* a tiny randomly initialised local causal LM and seq2seq LM (transformers, tokenizer built offline) saved to a
  temporary folder, driven through the `hf` backend.
"""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from echocare_clip import captions as C
from echocare_clip.cli import UserError
from echocare_clip.config import CaptionsConfig

KEY_ENV, KEY = 'ECHOCARE_TEST_LLM_KEY', 'sk-test-0123456789abcdef-not-a-real-key'

BREAST_OK = ['Ultrasound of the breast showing a benign lesion, a circumscribed oval finding of the breast that carries '
             'benign imaging features on this grayscale sonographic examination.',
             'Breast ultrasound image with a benign lesion: the sonographic appearance of this breast finding is '
             'benign, with a smooth outline and no worrying features described.',
             'A benign breast lesion seen on a B-mode breast ultrasound scan, with sonographic features typical of a '
             'benign finding in the breast tissue.']
THYROID_NORMAL = ['Ultrasound of a normal thyroid gland, with homogeneous parenchyma and a reassuring, entirely '
                  'unremarkable appearance of the thyroid on this grayscale scan.'] * 3
THYROID_BIRADS = ['Thyroid ultrasound of a nodule classified as BI-RADS 2, a benign-appearing thyroid nodule that is not '
                  'suspicious for malignancy on this grayscale sonographic examination.'] * 3


def manifest() -> pd.DataFrame:
    "Two breast images (benign, BUS-BRA style) and two thyroid nodules (not suspicious, TI-RADS 3)."
    rows = []
    for i in range(2):
        rows.append({'image_path': f'/data/bus_bra/images/b{i}.png', 'dataset': 'bus_bra', 'organ': 'breast', 'label': 'benign',
                     'task': 'breast', 'group_id': f'bus_bra:{i}', 'split': 'train', 'report': '', 'report_lang': '',
                     'attributes': {'birads': 3, 'histology': 'fibroadenoma'}, 'source': ''})
        rows.append({'image_path': f'/data/ddti/images/t{i}.png', 'dataset': 'ddti_thyroid', 'organ': 'thyroid',
                     'label': 'not_suspicious', 'task': 'thyroid', 'group_id': f'ddti_thyroid:{i}', 'split': 'train',
                     'report': '', 'report_lang': '', 'attributes': {'tirads': '3'}, 'source': ''})
    return pd.DataFrame(rows)


class _Handler(BaseHTTPRequestHandler):
    "Canned /v1/chat/completions: breast prompts get faithful captions, thyroid prompts label flips."
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))))
        self.server.calls.append({'path': self.path, 'auth': self.headers.get('Authorization'), 'body': body})
        if self.server.status != 200:
            self.send_response(self.server.status); self.send_header('Content-Length', '0'); self.end_headers(); return
        user = body['messages'][-1]['content']
        source = user.split('Source caption:', 1)[1]
        if '- organ: thyroid' in user: caps = THYROID_BIRADS if 'TI-RADS' in source else THYROID_NORMAL
        else: caps = BREAST_OK
        data = json.dumps({'id': 'cmpl-1', 'object': 'chat.completion', 'model': body['model'],
                           'choices': [{'index': 0, 'finish_reason': 'stop',
                                        'message': {'role': 'assistant', 'content': json.dumps(caps)}}]}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json'); self.send_header('Content-Length', str(len(data)))
        self.end_headers(); self.wfile.write(data)

    def log_message(self, *args): pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    srv.calls, srv.status = [], 200
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown(); srv.server_close()


def _cfg(url: str, **kw) -> CaptionsConfig:
    return CaptionsConfig(strategy='llm', rewriter='openai', llm_base_url=url, llm_model='canned-model', llm_api_key_env=KEY_ENV,
                          llm_concurrency=3, llm_max_retries=1, llm_timeout_s=10, templates_per_image=2,
                          tier_weights={'attributes': 1, 'label': 1}, **kw)


def test_openai_endpoint_rewrites_validates_and_caches(server, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(KEY_ENV, KEY)
    cache = tmp_path / 'llm.jsonl'
    cfg = _cfg(f'http://127.0.0.1:{server.server_port}/v1')
    caps = C.build_captions(manifest(), cfg, seed=3, cache_path=cache, progress=False)

    prompts = {json.dumps(c['body']['messages']) for c in server.calls}
    # one request per distinct prompt (images with the same facts and source caption share one)
    assert len(server.calls) == len(prompts) == len(caps[['organ', 'base_caption']].drop_duplicates()) > 4
    assert {c['path'] for c in server.calls} == {'/v1/chat/completions'}
    assert {c['auth'] for c in server.calls} == {f'Bearer {KEY}'}
    body = server.calls[0]['body']
    assert (body['model'], body['temperature'], body['top_p']) == ('canned-model', 1.0, 0.95)
    assert 'three' in body['messages'][-1]['content'] and '15 to 60 words' in body['messages'][-1]['content']

    assert set(caps['rewriter']) == {'openai:canned-model'}
    breast, thyroid = caps[caps['organ'] == 'breast'], caps[caps['organ'] == 'thyroid']
    assert breast['accepted'].all() and breast['caption'].isin(BREAST_OK).all()
    assert not thyroid['accepted'].any()
    assert (thyroid['caption'] == thyroid['base_caption']).all()  # rejected rewrites fall back to the source caption
    reasons = set(';'.join(thyroid['reject_reason']).split(';'))
    assert 'lesion_became_normal' in reasons and 'birads_on_thyroid' in reasons
    summary = C.rewrite_summary(caps)
    assert summary['acceptance_rate'] == pytest.approx(len(breast) / len(caps))
    assert summary['reasons']['birads_on_thyroid'] >= 1 and summary['reasons']['lesion_became_normal'] >= 1

    n_calls = len(server.calls)
    again = C.build_captions(manifest(), cfg, seed=3, cache_path=cache, progress=False)
    assert len(server.calls) == n_calls  # cache hit: nothing sent
    pd.testing.assert_frame_equal(again, caps)
    assert len(cache.read_text().splitlines()) == n_calls

    written = tmp_path / 'captions.csv'
    C.save_captions(caps, written)
    out, err = capfd.readouterr()
    for text in (cache.read_text(), written.read_text(), out, err):
        assert KEY not in text  # the key travels only in the Authorization header


def test_dead_endpoint_gives_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(C, 'BACKOFF_S', 0.01)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    cache = tmp_path / 'llm.jsonl'
    with pytest.raises(UserError) as e:
        C.build_captions(manifest(), _cfg(f'http://127.0.0.1:{port}/v1'), cache_path=cache, progress=False)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and 'cannot reach' in msg and 'captions.llm_base_url' in msg and '2 tries' in msg
    assert not cache.exists()


def test_refused_key_names_the_variable_never_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.status = 401
    with pytest.raises(UserError) as e:
        C.build_captions(manifest(), _cfg(f'http://127.0.0.1:{server.server_port}/v1'), cache_path=tmp_path / 'c.jsonl', progress=False)
    assert KEY_ENV in str(e.value) and KEY not in str(e.value) and len(server.calls) == 1
    assert not (tmp_path / 'c.jsonl').exists()


def _tiny_lm(folder, seq2seq: bool = False):
    "A randomly initialised tiny GPT-2 (or BART) with a byte-level BPE tokenizer trained here, saved to `folder`."
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    import torch
    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    corpus = [C.LLM_SYSTEM, *BREAST_OK, *THYROID_NORMAL[:1], 'Facts: organ breast label benign findings Source caption']
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=['<pad>', '<s>', '</s>'],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', bos_token='<s>', eos_token='</s>')
    fast.save_pretrained(folder)
    if seq2seq:
        from transformers import BartConfig, BartForConditionalGeneration
        conf = BartConfig(vocab_size=len(fast), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=1024,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
        BartForConditionalGeneration(conf).save_pretrained(folder)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        conf = GPT2Config(vocab_size=len(fast), n_positions=1024, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
        GPT2LMHeadModel(conf).save_pretrained(folder)


@pytest.mark.parametrize('seq2seq', [False, True], ids=['causal', 'seq2seq'])
def test_local_hf_model_backend(tmp_path, seq2seq):
    folder = tmp_path / 'tiny-lm'
    _tiny_lm(folder, seq2seq)
    cache = tmp_path / 'llm.jsonl'
    cfg = CaptionsConfig(strategy='llm', rewriter='hf', llm_model=str(folder), templates_per_image=1, tiers=['label'])
    client = C.HFLocal(str(folder), max_new_tokens=24)
    m = manifest()
    base = C.build_captions(m, CaptionsConfig(templates_per_image=1, tiers=['label']), seed=0)
    caps = C.rewrite_captions(base, m, cfg, seed=0, cache_path=cache, client=client, progress=False)
    assert set(caps['rewriter']) == {f'hf:{folder}'}
    assert len(cache.read_text().splitlines()) == len(caps)
    # random weights produce gibberish: every kept caption is either a validated rewrite or the source caption
    ok = caps['accepted']
    assert (caps.loc[~ok, 'caption'] == caps.loc[~ok, 'base_caption']).all() and (caps.loc[~ok, 'reject_reason'] != '').all()
    assert all(C.validate_caption(c, o, l, t, b) == [] for c, o, l, t, b in
               caps.loc[ok, ['caption', 'organ', 'label', 'task', 'base_caption']].itertuples(index=False))
    # a rerun is served from the cache: the model folder is not even read
    import shutil
    shutil.rmtree(folder)
    again = C.rewrite_captions(base, m, cfg, seed=0, cache_path=cache, client=C.HFLocal(str(folder), max_new_tokens=24), progress=False)
    pd.testing.assert_frame_equal(again, caps)
    # ... and a prompt the cache lacks needs the (now missing) model: one clear line
    with pytest.raises(UserError, match='not a local model folder'):
        more = C.build_captions(m, CaptionsConfig(templates_per_image=4, tiers=['label']), seed=0)
        C.rewrite_captions(more, m, cfg, seed=0, cache_path=cache, client=C.HFLocal(str(folder), max_new_tokens=24), progress=False)
