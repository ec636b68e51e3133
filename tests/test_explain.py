"""`llm-sae explain`: a scripted chat server on 127.0.0.1, planted features, retries, resume.

The server speaks the chat-completions protocol. Its "explainer" either names the token
most often marked in the examples (an oracle: it states the planted feature) or a random
token of the examples; its scorers follow the explanation literally (a context activates
when it contains the named token; marks are right when they cover only it). So an
explanation that states the planted feature must score 1 and a random one about 0.5.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from llm_sae.analyze import AnalyzeConfig, analyze, load_feature
from llm_sae.common.atomic import write_json_atomic
from llm_sae.errors import ExplainError
from llm_sae.explain.client import ChatClient
from llm_sae.explain.examples import split_examples
from llm_sae.explain.prompts import format_example, parse_explanation, parse_labels
from llm_sae.explain.run import ExplainConfig, explain, read_result
from llm_sae.sae import REGISTRY, SAEConfig
from llm_sae.store import StoreWriter

N_FEAT, L, S = 6, 24, 150
PLANT = 10  # feature i fires on token PLANT + i


class FakeLLM:
    """Scripted answers; ``fail`` is a list of HTTP statuses for the next requests."""

    def __init__(self, mode: str = "oracle", delay: float = 0.0):
        self.mode, self.delay = mode, delay
        self.fail: list[int] = []
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.rng = random.Random(0)

    def answer(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            status = self.fail.pop(0) if self.fail else 200
        try:
            time.sleep(self.delay)
            system, user = body["messages"][0]["content"], body["messages"][1]["content"]
            kind = re.match(r"\[(\w+)-v\d+\]", system).group(1)
            with self.lock:
                self.log.append((kind, user))
            if status != 200:
                return status, {"error": {"message": "scripted failure"}}
            text = getattr(self, kind)(user)
            return 200, {"choices": [{"message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": len(text) // 4,
                                   "total_tokens": (len(user) + len(text)) // 4}}
        finally:
            with self.lock:
                self.in_flight -= 1

    def explain(self, user: str) -> str:
        marked = [t for line in user.splitlines() if line.startswith("Activations:")
                  for t in re.findall(r'\("(.*?)", \d+\)', line)]
        if self.mode == "oracle":
            tok = Counter(marked).most_common(1)[0][0]
        else:
            with self.lock:
                tok = f"<id {self.rng.randrange(40)}>"  # any token of the vocabulary
        return f'Thinking... the marked tokens.\n[EXPLANATION]: the token "{tok}"'

    @staticmethod
    def _named(user: str) -> tuple[str, list[str]]:
        tok = re.search(r'Explanation: .*?"(.*)"', user).group(1)
        return tok, [ln.split(": ", 1)[1] for ln in user.splitlines() if ln.startswith("Example ")]

    def detection(self, user: str) -> str:
        tok, examples = self._named(user)
        return json.dumps([int(tok in ex) for ex in examples])

    def fuzzing(self, user: str) -> str:
        tok, examples = self._named(user)
        ok = [all(span.replace(tok, "") == "" for span in re.findall(r"<<((?:<id \d+>)+)>>", ex)) for ex in examples]
        return "Answer: " + json.dumps([int(o) for o in ok])

    def count(self, kind: str) -> int:
        return sum(k == kind for k, _ in self.log)


def serve_fake(llm: FakeLLM) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            assert self.path == "/v1/chat/completions"
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, obj = llm.answer(body)
            data = json.dumps(obj).encode()
            self.send_response(status)
            if status != 200:  # the openai client's own back-off (0.5 s, doubling) yields to this
                self.send_header("retry-after-ms", "5")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client was killed mid-request (the SIGKILL test)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def llm():
    fake = FakeLLM()
    server = serve_fake(fake)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An analysis of an SAE whose feature i fires exactly on token PLANT + i."""
    root = tmp_path_factory.mktemp("planted")
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(16, 40, (S, L), generator=g)
    plant = torch.rand(S, L, generator=g) < 0.08
    toks[plant] = PLANT + torch.randint(0, N_FEAT, (int(plant.sum()),), generator=g)
    toks[:, 0] = 0
    seq, pos = torch.arange(S)[:, None].expand(S, L)[:, 1:], torch.arange(L)[None, :].expand(S, L)[:, 1:]
    t = toks[:, 1:].reshape(-1)
    x = torch.zeros(len(t), N_FEAT)
    hit = (t >= PLANT) & (t < PLANT + N_FEAT)
    x[hit.nonzero().flatten(), (t[hit] - PLANT)] = 1.0 + torch.rand(int(hit.sum()), generator=g) * 3
    meta = {"d_in": N_FEAT, "dtype": "float32", "hook": "blocks.0.hook_resid_post", "context_length": L}
    with StoreWriter(root / "store", meta=meta, shard_rows=1000) as w:
        w.append(x, t, torch.stack([seq.reshape(-1), pos.reshape(-1)], 1))
        w.add_sequences(toks)
    sae = REGISTRY["topk"](SAEConfig(d_in=N_FEAT, n_latents=N_FEAT, k=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(N_FEAT)), sae.W_dec.copy_(torch.eye(N_FEAT))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    sae.save(root / "sae")
    analyze(AnalyzeConfig(sae=str(root / "sae"), store=str(root / "store"), out=str(root / "analysis"),
                          top_k=12, context_before=6, context_after=3, n_bins=4, per_bin=3,
                          logits=False, progress=False, device="cpu", n_neighbours=2))
    return root / "analysis"


def cfg(analysis, url, out, **kw):
    base = dict(analysis=str(analysis), model="fake", endpoint=url, out=str(out),
                concurrency=4, progress=False, score_examples=8, explain_examples=5, batch=6,
                negative_windows=200)
    base.update(kw)
    return ExplainConfig(**base)


# ---------------------------------------------------------------------------- prompts
def test_examples_mark_activating_runs_like_delphi():
    assert format_example(["a", " b", " c", "\n", "d"], [False, True, True, False, True]) == "a<< b c>>\\n<<d>>"
    assert parse_labels("I think [1, 0]\nfinal: [0, 1, 1]", 3) == [0, 1, 1]
    assert parse_labels("[1, 0]", 3) is None
    assert parse_explanation("blah\n[EXPLANATION]:  the token \"x\"  \n") == 'the token "x"'
    assert parse_explanation('[EXPLANATION]: "commas"') == "commas"


# ---------------------------------------------------------------------------- client
def test_client_retries_429_and_5xx_over_http(llm):
    llm.fail = [429, 500, 503]
    client = ChatClient(llm.url, "fake", max_retries=3)
    t0 = time.perf_counter()
    reply = client.complete([{"role": "system", "content": "[explain-v1]"},
                             {"role": "user", "content": 'Activations: ("<id 3>", 9)'}])
    assert 'the token "<id 3>"' in reply.text and reply.retries == 3
    assert time.perf_counter() - t0 < 1.0  # the server's retry-after-ms (5 ms) won over 0.5+1+2 s
    assert len(llm.log) == 4 and client.usage.retries == 3 and client.usage.requests == 1
    assert client.usage.prompt_tokens > 0 and client.usage.cost(1e6, 0) == client.usage.prompt_tokens

    llm.fail = [500] * 5
    with pytest.raises(ExplainError, match="failed 3 times"):
        ChatClient(llm.url, "fake", max_retries=2).complete(
            [{"role": "system", "content": "[explain-v1]"}, {"role": "user", "content": ""}])
    llm.fail, n = [401], len(llm.log)
    with pytest.raises(ExplainError, match="401.*api-key-env"):
        client.complete([{"role": "system", "content": "[explain-v1]"}, {"role": "user", "content": ""}])
    assert len(llm.log) == n + 1  # not retried


def test_client_bounds_concurrency_and_refuses_non_http(llm):
    llm.delay = 0.05
    client = ChatClient(llm.url, "fake", concurrency=2)
    msgs = [{"role": "system", "content": "[detection-v1]"},
            {"role": "user", "content": 'Explanation: "x"\n\nExample 1: x'}]
    threads = [threading.Thread(target=client.complete, args=(msgs,)) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert llm.max_in_flight == 2 and client.usage.requests == 8
    with pytest.raises(ExplainError, match="http"):
        ChatClient("file:///etc/passwd", "m")


# ---------------------------------------------------------------------------- scores
def test_stated_planted_feature_scores_one_and_random_about_half(planted, llm, tmp_path):
    s = explain(cfg(planted, llm.url, tmp_path / "oracle"))
    assert s["n_explained"] == N_FEAT
    for i in range(N_FEAT):
        r = read_result(tmp_path / "oracle", i)
        assert r["explanation"] == f'the token "<id {PLANT + i}>"'
        assert r["scores"]["detection"]["balanced_accuracy"] == 1.0
        assert r["scores"]["fuzzing"]["balanced_accuracy"] == 1.0
        assert r["scores"]["detection"]["n"] == 16  # 8 held out + 8 negatives
    assert s["scores"]["detection"]["mean_balanced_accuracy"] == 1.0
    assert s["usage"]["prompt_tokens"] > 0 and s["this_run"]["requests"] == len(llm.log)
    # The explainer never saw a scored example.
    rec = load_feature(planted, 0)
    shown, held = split_examples(rec, 5, 8, seed=0)
    assert read_result(tmp_path / "oracle", 0)["explained_on"] == [w.row for w in shown]
    assert len(held) == 8 and not {w.row for w in shown} & {w.row for w in held}

    llm.mode = "random"
    s = explain(cfg(planted, llm.url, tmp_path / "random"))
    det = s["scores"]["detection"]["mean_balanced_accuracy"]
    fuzz = s["scores"]["fuzzing"]["mean_balanced_accuracy"]
    print(f"random explainer: detection {det}, fuzzing {fuzz}")
    assert 0.35 <= det <= 0.65 and 0.35 <= fuzz <= 0.65


def test_rerun_asks_only_for_what_is_missing(planted, llm, tmp_path):
    out = tmp_path / "run"
    explain(cfg(planted, llm.url, out, scorers=["fuzzing"]))
    n = len(llm.log)
    explain(cfg(planted, llm.url, out, scorers=["fuzzing"]))
    assert len(llm.log) == n  # all done: nothing asked
    explain(cfg(planted, llm.url, out))  # detection added later: only detection prompts
    assert {k for k, _ in llm.log[n:]} == {"detection"} and llm.count("explain") == N_FEAT
    with pytest.raises(ExplainError, match="other settings.*model"):
        explain(cfg(planted, llm.url, out, model="other"))
    explain(cfg(planted, llm.url, out, model="other", overwrite=True, features=[2]))
    assert read_result(out, 2)["model"] == "other" and read_result(out, 3) is None


def test_errors_before_any_request(planted, llm, tmp_path):
    with pytest.raises(ExplainError, match="--model"):
        explain(cfg(planted, llm.url, tmp_path / "a", model=None))
    with pytest.raises(ExplainError, match="0..5"):
        explain(cfg(planted, llm.url, tmp_path / "a", features=[6]))
    with pytest.raises(ExplainError, match="--store and --sae"):
        explain(cfg(planted, llm.url, tmp_path / "a", store=str(tmp_path / "nope")))
    assert llm.log == []


@pytest.mark.slow
def test_sigkill_loses_only_requests_in_flight(planted, llm, tmp_path):
    """A real process killed mid-run; the rerun continues and ends as an unkilled run."""
    llm.delay = 0.15
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "llm_sae.cli", "explain", "--analysis", str(planted), "--model", "fake",
            "--endpoint", llm.url, "--out", str(out), "--concurrency", "2", "--score-examples", "8",
            "--explain-examples", "5", "--batch", "6", "--negative-windows", "200", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("features/*/*.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    asked_before = len(llm.log)
    per_feature = 1 + 3 + 2  # explain; detection 16 items and fuzzing 8, in prompts of 6
    assert asked_before < per_feature * N_FEAT, "the run finished before it was killed"
    llm.delay = 0.0
    explain(cfg(planted, llm.url, out, concurrency=2))
    done = [read_result(out, i) for i in range(N_FEAT)]
    assert all(r["scores"]["detection"]["balanced_accuracy"] == 1.0 for r in done)
    # Each feature was explained once, except requests the kill cut off (at most 2 in flight).
    assert N_FEAT <= llm.count("explain") <= N_FEAT + 2
    assert len(llm.log) <= per_feature * N_FEAT + 2


# ---------------------------------------------------------------------------- dashboard, export
XSS = '</script><img src=x onerror=alert(1)> & "quotes"'


def test_dashboard_and_neuronpedia_export_carry_explanations(planted, llm, tmp_path):
    import gzip

    from llm_sae.dashboard import DashboardConfig, build_dashboard
    from llm_sae.explain.run import result_path
    from llm_sae.interop import export_neuronpedia

    out = tmp_path / "expl"
    explain(cfg(planted, llm.url, out, features=[0, 1, 2]))
    r = read_result(out, 1)
    r["explanation"] = XSS
    write_json_atomic(result_path(out, 1), r)

    site = tmp_path / "site"
    build_dashboard(DashboardConfig(analysis=str(planted), out=str(site), explanations=str(out)))
    index_js = (site / "data" / "index.js").read_text()
    assert "<img" not in index_js and "</script" not in index_js
    idx = json.loads(index_js[len("window.LLM_SAE_INDEX="):-2])
    assert idx["expl"][:4] == [f'the token "<id {PLANT}>"', XSS, f'the token "<id {PLANT + 2}>"', None]
    assert idx["score"][:4] == [1.0, 1.0, 1.0, None]
    page = (site / "data" / "features" / "000" / "f_000001.js").read_text()
    assert "<img" not in page
    got = json.loads(page[page.index(",") + 1 : -3])["explanation"]
    assert got == {"text": XSS, "scores": {"detection": 1.0, "fuzzing": 1.0}, "model": "fake", "score": 1.0}
    assert "steer.js" in (site / "live.html").read_text() and (site / "assets" / "steer.js").is_file()

    src = export_neuronpedia(planted, tmp_path / "np", model_id="fake-model", explanations=out)
    lines = gzip.decompress((src / "explanations" / "batch-0.jsonl.gz").read_bytes()).decode().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [x["index"] for x in recs] == ["0", "1", "2"] and recs[1]["description"] == XSS
    assert recs[0]["explanationModelName"] == "fake" and recs[0]["layer"] == "0-llm-sae"
    assert {s["explanationScoreTypeName"]: s["value"] for s in recs[0]["scores"]} == {"detection": 1.0, "fuzzing": 1.0}


@pytest.mark.slow
def test_local_hf_backend_explains_with_no_server(planted, tmp_path):
    """--backend hf: the embedded LM as the chat model. It writes no useful answers, so the
    scorers parse nothing: the feature gets an explanation and no score (not a zero)."""
    s = explain(ExplainConfig(analysis=str(planted), model="tiny-stdlib", backend="hf", out=str(tmp_path / "hf"),
                              features=[0], scorers=["fuzzing"], max_tokens=8, progress=False, score_examples=4))
    r = read_result(tmp_path / "hf", 0)
    assert isinstance(r["explanation"], str) and r["usage"]["prompt_tokens"] > 0
    assert s["this_run"]["requests"] == 2 and s["n_explained"] == 1
    fz = r["scores"]["fuzzing"]
    assert fz["parse_failures"] == 1 and fz["balanced_accuracy"] is None


def test_one_reader_for_explanations_refuses_a_folder_that_is_not_explain_output(planted, tmp_path):
    """dashboard and export both read through llm_sae.common.explanation_files: a wrong
    --explanations fails there, in one line, before a site or an export is written."""
    from llm_sae.common.explanation_files import find_explanations, load_explanation, result_path
    from llm_sae.dashboard import DashboardConfig, build_dashboard
    from llm_sae.interop import export_neuronpedia

    (tmp_path / "notes").mkdir()
    for build in (lambda: build_dashboard(DashboardConfig(analysis=str(planted), out=str(tmp_path / "site"),
                                                          explanations=str(tmp_path / "notes"))),
                  lambda: export_neuronpedia(planted, tmp_path / "np", model_id="m", explanations=tmp_path / "notes")):
        with pytest.raises(ExplainError, match="not the output of `llm-sae explain`"):
            build()
    assert not (tmp_path / "site" / "index.html").exists() and not (tmp_path / "np").exists()
    assert find_explanations(planted) is None  # no ANALYSIS/explanations: nothing to show
    (tmp_path / "notes" / "run.json").write_text("{}")
    result_path(tmp_path / "notes", 3).parent.mkdir(parents=True)
    result_path(tmp_path / "notes", 3).write_text("{torn")  # a hand-edited file reads as absent
    assert load_explanation(tmp_path / "notes", 3) is None
