"""`lorasmith serve`: the official openai client against a server on 127.0.0.1 (bounded in time and count),
OpenAI-shaped errors, batching under load, and a cancelled stream freeing the worker."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from tests.conftest import write_jsonl

from lorasmith.cli import main

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).parent.parent
SYSTEM = "You are a ticket triage assistant."
PROMPT = "My invoice is wrong, please help."
KEY = "test-key"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A tiny trained run whose conversations all share one system prompt."""
    folder = tmp_path_factory.mktemp("serve")
    rows = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"ticket {i}: the app crashes"},
                {"role": "assistant", "content": f"category=bug; priority={'high' if i % 2 else 'low'}"},
            ]
        }
        for i in range(16)
    ]
    data = write_jsonl(folder / "train.jsonl", rows)
    args = ["train", f"model.name={tiny_model_dir}", f"data.train={data}", f"output.dir={folder}", "output.name=triage"]
    assert main([*args, "train.max_steps=2", "eval.samples=0", "train.lr=1e-2"]) == 0
    return folder / "triage"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run, *extra):
    port = _free_port()
    cmd = [sys.executable, "-m", "lorasmith", "serve", str(run), "--port", str(port), "--api-key", KEY, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()[-3000:]}")
    else:
        proc.kill()
        pytest.fail("server did not start within 120 s")
    return proc, base


@pytest.fixture(scope="module")
def server(run):
    proc, base = _start(run, "--max-tokens", "64")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def _client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, timeout=60, max_retries=0)


def test_openai_client_lists_models_and_answers_like_lorasmith_chat(server, run, capsys):
    client = _client(server)
    ids = [m.id for m in client.models.list().data]
    assert "triage" in ids and len(ids) == 2  # the adapter and its base
    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model="triage", messages=messages, temperature=0, max_tokens=16, seed=0)
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 16
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    stream = client.chat.completions.create(model="triage", messages=messages, temperature=0, max_tokens=16, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    # The same answer as `lorasmith chat` gives, which also uses the run's training system prompt.
    capsys.readouterr()
    assert main(["chat", str(run), "--prompt", PROMPT, "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == choice.message.content.strip()
    assert "trained with" in out.err


def test_bad_requests_get_openai_shaped_errors(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = {"model": "triage", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({**ok, "n": 2}, auth, 400, "n"),
        ({**ok, "max_tokens": 65}, auth, 400, "max_tokens"),
        ({**ok, "messages": [{"role": "robot", "content": "hi"}]}, auth, 400, "messages.0.role"),
        ({**ok, "temperature": 3}, auth, 400, "temperature"),
        ({**ok, "model": "nope"}, auth, 404, "model"),
        (ok, {"Authorization": "Bearer wrong"}, 401, None),
        ({**ok, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, auth, 413, None),
        ({**ok, "top_logprobs": 2}, auth, 400, "top_logprobs"),
        ({**ok, "logprobs": True, "top_logprobs": 21}, auth, 400, "top_logprobs"),
        ({**ok, "frequency_penalty": 0.5}, auth, 400, "frequency_penalty"),
        ({**ok, "response_format": {"type": "xml"}}, auth, 400, "response_format.type"),
        (
            {
                **ok,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
                },
            },
            auth,
            400,
            "response_format",
        ),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, auth, 400, None),
    ]
    for body, headers, status, param in cases:
        r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == status, (body.get("n"), r.text[:300])
        error = r.json()["error"]
        assert error["message"] and error["type"] and (param is None or error["param"] == param)
    # Fields that ask for nothing are accepted as OpenAI clients send them.
    fine = {**ok, "user": "u1", "frequency_penalty": 0, "presence_penalty": 0, "stream_options": None, "logprobs": False}
    assert httpx.post(f"{server}/v1/chat/completions", json=fine, headers=auth, timeout=30).status_code == 200
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_few_hundred_concurrent_requests_all_answered(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    results, lock = [], threading.Lock()

    def client(k):
        with httpx.Client(timeout=120) as http:
            for i in range(15):
                body = {"model": "triage", "messages": [{"role": "user", "content": f"ticket {k}-{i}"}], "max_tokens": 4}
                r = http.post(f"{server}/v1/chat/completions", json=body, headers=auth)
                with lock:
                    results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 240
    assert all(status == 200 and body["choices"][0]["message"]["content"] is not None for status, body in results)


def test_a_cancelled_stream_stops_generating(tiny_model_dir):
    """A client that goes away mid-stream: generation stops at the next token, freeing the worker."""
    from lorasmith.serving.chat import load_served
    from lorasmith.serving.engine import Engine, Request, Served

    model, tokenizer, precision = load_served(str(tiny_model_dir), {})
    engine = Engine(model, tokenizer, precision, [Served("base", None)])
    try:
        req = engine.submit(Request("base", [{"role": "user", "content": "hi"}], max_tokens=500, stream=True))
        assert req.chunks.get(timeout=60)  # the first piece of text arrived
        req.cancelled.set()
        done = req.result.result(timeout=60)
        assert done.completion_tokens < 500
        # The worker is free: the next request is answered.
        nxt = engine.submit(Request("base", [{"role": "user", "content": "hi"}], max_tokens=3))
        assert nxt.result.result(timeout=60).completion_tokens <= 3
    finally:
        engine.close()


def test_a_full_queue_is_a_503(tiny_model_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from lorasmith.serving import engine as engine_mod
    from lorasmith.serving.server import create_app

    release = threading.Event()

    class Blocked(Scripted):  # the worker stays in its first step
        def step(self):
            release.wait(timeout=30)
            raise RuntimeError("stopped by the test")

    monkeypatch.setattr(engine_mod, "Batcher", Blocked)
    engine = engine_mod.Engine(None, None, None, [engine_mod.Served("m", None)], max_queue=1)
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        engine.submit(engine_mod.Request("m", body["messages"], 4))  # taken by the worker, which blocks
        time.sleep(0.3)
        engine.submit(engine_mod.Request("m", body["messages"], 4))  # waits in the queue (size 1)
        r = TestClient(create_app(engine)).post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    finally:
        release.set()
        engine.close()


def test_serve_without_anything_to_serve_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert main(["serve", str(tmp_path / "run")]) == 2
    assert "has no adapter yet" in capsys.readouterr().err


def test_requests_join_a_running_batch_and_leave_it_as_they_end(tiny_model_dir):
    """Continuous batching: four streamed requests sent while a long one runs join its batch between decode
    steps and all end before it does; each streams its own answer, and that answer is what the model gives
    the same prompt alone (transformers' generate), though prefilled in chunks and decoded beside others."""
    import torch

    from lorasmith.serving.chat import load_served
    from lorasmith.serving.engine import Engine, Request, Served

    model, tokenizer, precision = load_served(str(tiny_model_dir), {})
    engine = Engine(model, tokenizer, precision, [Served("base", None)], max_batch=5, prefill_chunk=8)
    prompts = [f"question {k} " * (k + 1) for k in range(4)]
    try:
        busy = engine.submit(Request("base", [{"role": "user", "content": "go on"}], max_tokens=400))
        deadline = time.monotonic() + 60
        while engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        streams = [engine.submit(Request("base", [{"role": "user", "content": p}], 12, stream=True)) for p in prompts]
        answers = [req.result.result(timeout=120) for req in streams]
        assert not busy.result.done()  # none of them waited for the long one
        busy.result.result(timeout=120)
        for prompt, req, done in zip(prompts, streams, answers):
            pieces = []
            while (piece := req.chunks.get(timeout=10)) is not None:
                pieces.append(piece)
            assert "".join(pieces) == done.text and done.completion_tokens <= 12
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                alone = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
            assert done.text == tokenizer.decode(alone[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        engine.close()


def test_requests_for_two_adapters_and_seeds_answer_as_each_alone(tiny_model_dir, run):
    """Requests for the base and for an adapter sent together: the batch switches adapter when it drains,
    and each greedy answer equals that model's own answer alone; a sampled request with a seed gives the
    same text alone and beside others (its own generator), and stop strings end rows where they appear."""
    from contextlib import nullcontext

    from lorasmith.evaluation.generate import Sampling, complete
    from lorasmith.serving.chat import load_served
    from lorasmith.serving.engine import Engine, Request, Served

    model, tokenizer, precision = load_served(None, {"triage": run / "adapter"})
    prompts = [f"ticket {k}: the app crashes" for k in range(6)]
    alone = []  # transformers' generate through lorasmith's own path, in the precision the engine serves in,
    for k, prompt in enumerate(prompts):  # before the engine owns the model (it switches adapters on it)
        with model.disable_adapter() if k % 2 else nullcontext():
            alone += complete(model, tokenizer, [[{"role": "user", "content": prompt}]], precision=precision, max_new_tokens=10)
    with model.disable_adapter():
        (base_0,) = complete(
            model, tokenizer, [[{"role": "user", "content": prompts[0]}]], precision=precision, max_new_tokens=10
        )
    assert base_0.text != alone[0].text  # the adapter changes the answer: switching it is tested
    engine = Engine(model, tokenizer, precision, [Served("base", None), Served("triage", "triage")], max_batch=3)
    try:
        reqs = [
            engine.submit(Request("base" if k % 2 else "triage", [{"role": "user", "content": p}], 10))
            for k, p in enumerate(prompts)
        ]
        assert [r.result.result(timeout=120).text for r in reqs] == [a.text for a in alone]
        seeded = Sampling(temperature=1.0, top_p=0.9, seed=3)
        alone = engine.submit(Request("triage", [{"role": "user", "content": "hi"}], 12, sampling=seeded)).result.result(120)
        crowd = [
            engine.submit(Request("triage", [{"role": "user", "content": p}], 12, sampling=Sampling(1.0))) for p in prompts[:2]
        ]
        beside = engine.submit(Request("triage", [{"role": "user", "content": "hi"}], 12, sampling=seeded))
        assert beside.result.result(120).text == alone.text and all(c.result.result(120) for c in crowd)
        if len(alone.text) > 3:
            cut = alone.text[2:4]
            stopped = engine.submit(Request("triage", [{"role": "user", "content": "hi"}], 12, sampling=seeded, stop=(cut,)))
            done = stopped.result.result(120)
            assert done.text == alone.text[: alone.text.index(cut)] and done.finish_reason == "stop"
    finally:
        engine.close()


class Scripted:
    """A stand-in for the engine's Batcher whose rows end at their first step with ``answer(req)``."""

    answer = staticmethod(lambda req: None)

    def __init__(self, *args, **kwargs):
        self.done, self.masker = [], None

    size = property(lambda self: len(self.done))
    busy = property(lambda self: bool(self.done))

    def room(self):
        return 8 - len(self.done)

    def requests(self):
        return [req for req, _ in self.done]

    def admit(self, reqs):
        self.done += [(req, type(self).answer(req)) for req in reqs]

    def step(self):
        ended, self.done = self.done, []
        for req, done in ended:
            if req.chunks is not None:
                req.chunks.put(done.text)
        return ended

    def cancel_all(self, error):
        reqs, self.done = self.requests(), []
        return reqs


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture
def scripted(monkeypatch):
    """The app in process, its model's answers scripted: a call to any question, a sentence once a tool
    result came back, and a reasoning block before an answer to "Think first.". Yields the openai client,
    the HTTP client, and what generation was handed (history, rendered tools, prefill)."""
    from fastapi.testclient import TestClient

    from lorasmith.evaluation.generate import Completion
    from lorasmith.models.loading import chat_template_text
    from lorasmith.serving import engine as engine_mod
    from lorasmith.serving.server import create_app

    class Tok:  # only what the engine reads: the template that decides the call syntax
        chat_template = chat_template_text("chatml-tools")

    seen = []
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'

    def answer(req):
        seen.append((req.messages, req.tools, req.prefill))
        last = req.messages[-1]
        text = "It is 3 C in Oslo." if last["role"] == "tool" else call_text
        if last["content"] == "Think first.":
            text = "<think>\nThe user wants a plan.\n</think>\n\nHere is the plan."
        if req.prefill:
            text = text[len(req.prefill) :]
        return Completion(text, "stop", 10, 5, text)

    monkeypatch.setattr(engine_mod, "Batcher", type("ScriptedAnswers", (Scripted,), {"answer": staticmethod(answer)}))
    monkeypatch.setattr(engine_mod, "template_of", lambda tok: None)
    monkeypatch.setattr(engine_mod.Engine, "prompt_tokens", lambda self, *a: 10)
    engine = engine_mod.Engine(None, Tok(), None, [engine_mod.Served("m", None)])
    try:
        http = TestClient(create_app(engine))
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0), http, seen
    finally:
        engine.close()


def test_openai_client_runs_a_two_round_tool_loop(scripted):
    """The real openai client against the app (in process): tools and tool_choice reach the chat template,
    a call the model writes comes back as tool_calls (finish_reason tool_calls, also streamed as deltas),
    the client's tool result goes back in, and the model's answer to it ends the loop. The model's
    answers are scripted: what is tested is the protocol, not the model."""
    client, http, seen = scripted
    tools = TOOLS
    messages = [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Oslo?"}]},
    ]
    first = client.chat.completions.create(model="m", messages=messages, tools=tools, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"} and call.id
    history, rendered_tools, _ = seen[-1]
    assert history[0] == {"role": "system", "content": "Use tools."} and history[1]["content"] == "Oslo?"
    assert rendered_tools[0]["function"]["name"] == "get_weather"
    # Round two: the call and its result go back; the answer is plain text.
    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "3 C"}]
    second = client.chat.completions.create(model="m", messages=messages, tools=tools, temperature=0)
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content == "It is 3 C in Oslo."
    history = seen[-1][0]
    assert history[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert history[3] == {"role": "tool", "content": "3 C", "tool_call_id": call.id}
    # Streamed: the call arrives as tool-call deltas that the client joins.
    stream = client.chat.completions.create(model="m", messages=messages[:2], tools=tools, temperature=0, stream=True)
    chunks = list(stream)
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    # A named tool_choice: the server writes the call's opening, the model the arguments.
    forced = {"type": "function", "function": {"name": "get_weather"}}
    named = client.chat.completions.create(model="m", messages=messages[:2], tools=tools, tool_choice=forced, temperature=0)
    assert seen[-1][2].startswith('<tool_call>\n{"name": "get_weather"')
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    # A named choice renders that tool only, yet earlier calls to the other declared tools stay valid.
    both = [*tools, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    named_time = {"type": "function", "function": {"name": "get_time"}}
    again = client.chat.completions.create(model="m", messages=messages, tools=both, tool_choice=named_time, temperature=0)
    assert [t["function"]["name"] for t in seen[-1][1]] == ["get_time"] and again.choices[0].message
    # tool_choice none: no tools rendered, no call parsed.
    client.chat.completions.create(model="m", messages=messages[:2], tools=tools, tool_choice="none", temperature=0)
    assert seen[-1][1] is None
    # Bad tool messages are 400s naming the field.
    for bad in (
        [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
          "function": {"name": "get_weather", "arguments": "{oops"}}]}],
    ):  # fmt: skip
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": bad, "tools": tools})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text


def test_reasoning_comes_back_as_reasoning_content(scripted):
    client, _http, _seen = scripted
    # Reasoning comes back as reasoning_content, not inside the content, plain and streamed.
    ask = [{"role": "user", "content": "Think first."}]
    plain = client.chat.completions.create(model="m", messages=ask, temperature=0)
    assert plain.choices[0].message.content == "Here is the plan."
    assert plain.choices[0].message.model_extra["reasoning_content"] == "The user wants a plan."
    chunks = list(client.chat.completions.create(model="m", messages=ask, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Here is the plan."
    thought = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks]
    assert "The user wants a plan." in thought


def test_an_over_context_prompt_is_refused_before_queueing(server):
    """The tiny model's context is 1,024 tokens: a prompt over it is a 400 naming both numbers within a
    second, and the next request is answered at once (nothing was queued)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"model": "triage", "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 8}
    started = time.monotonic()
    r = httpx.post(f"{server}/v1/chat/completions", json=long, headers=auth, timeout=30)
    assert r.status_code == 400 and time.monotonic() - started < 5, r.text
    error = r.json()["error"]
    assert error["param"] == "messages" and "1024" in error["message"] and "max_tokens 8" in error["message"]
    ok = {"model": "triage", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    started = time.monotonic()
    assert httpx.post(f"{server}/v1/chat/completions", json=ok, headers=auth, timeout=30).status_code == 200
    assert time.monotonic() - started < 10


def test_a_chunked_body_over_the_limit_is_a_413(server):
    """No Content-Length (chunked transfer): the limit holds while the body is read."""
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    piece = b"x" * (64 << 10)

    def body():
        yield b'{"model": "triage", "messages": [{"role": "user", "content": "'
        for _ in range(32):  # 2 MiB of content
            yield piece
        yield b'"}]}'

    r = httpx.post(f"{server}/v1/chat/completions", content=body(), headers=auth, timeout=30)
    assert r.status_code == 413 and "body over" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health", headers=auth, timeout=10).json()["status"] == "ok"
    metrics = httpx.get(f"{server}/metrics", headers=auth, timeout=10).text
    assert "lorasmith_queue_depth 0" in metrics and 'lorasmith_requests_total{outcome="ok"}' in metrics
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    answered = int(values['lorasmith_requests_total{outcome="ok"}'])
    assert answered > 0 and int(values['lorasmith_request_seconds_bucket{le="+Inf"}']) == answered
    assert int(values["lorasmith_request_seconds_count"]) == answered and float(values["lorasmith_request_seconds_sum"]) > 0


def test_sigterm_during_a_long_generation_exits_within_the_grace(run):
    import signal

    proc, base = _start(run, "--max-tokens", "900", "--grace", "1")
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "triage", "messages": [{"role": "user", "content": "go"}], "max_tokens": 900, "stream": True}
        got = threading.Event()

        def stream():
            try:
                with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
                    for _ in r.iter_lines():
                        got.set()
            except httpx.HTTPError:
                pass

        client = threading.Thread(target=stream, daemon=True)
        client.start()
        assert got.wait(60)  # the generation is under way
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 10  # the grace (1 s) and the step in flight, not the 900 tokens
    finally:
        if proc.poll() is None:
            proc.kill()


def test_plain_completions_continue_the_prompt_as_it_is(server, run):
    """/v1/completions with the openai client: the prompt continued without the chat template, the same
    greedy text as transformers' generate on base + adapter from the prompt's own tokens; streamed the same;
    fields it cannot honour refused by name."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasmith.evaluation.generate import stop_token_ids

    client = _client(server)
    prompt = "The capital of France is"
    got = client.completions.create(model="triage", prompt=prompt, max_tokens=8, temperature=0)
    text = got.choices[0].text
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    base_dir = next(line.split(": ", 1)[1].strip() for line in (run / "config.yaml").read_text().splitlines() if "name:" in line)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run / "adapter")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=stop_token_ids(tokenizer, model))
    assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert got.object == "text_completion" and got.usage.prompt_tokens == ids.shape[1]
    streamed = list(client.completions.create(model="triage", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == got.choices[0].finish_reason
    auth = {"Authorization": f"Bearer {KEY}"}
    for extra, param in (({"echo": True}, "echo"), ({"prompt": ["a", "b"]}, "prompt"), ({"logprobs": 6}, "logprobs")):
        body = {"model": "triage", "prompt": prompt, "max_tokens": 4, **extra}
        r = httpx.post(f"{server}/v1/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_response_format_json_schema_and_logprobs_through_the_openai_client(server, run):
    """response_format by constrained decoding: a strict schema's answer parses and validates even from a
    tiny random model; json_object starts an object; logprobs are the model's own (the greedy token is
    the top alternative, and the first one equals the log-softmax of a forward pass of the prompt)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = _client(server)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "level": {"type": "string", "enum": ["low", "high"]}},
        "required": ["ok", "level"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "triage", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": PROMPT}]
    got = client.chat.completions.create(model="triage", messages=messages, max_tokens=40, temperature=0, response_format=fmt)
    answer = json.loads(got.choices[0].message.content)
    assert set(answer) == {"ok", "level"} and isinstance(answer["ok"], bool) and answer["level"] in ("low", "high")
    assert got.choices[0].finish_reason == "stop"
    any_object = client.chat.completions.create(
        model="triage", messages=messages, max_tokens=40, temperature=0, response_format={"type": "json_object"}
    ).choices[0]
    assert any_object.message.content.startswith("{")
    if any_object.finish_reason == "stop":
        assert isinstance(json.loads(any_object.message.content), dict)

    with_logprobs = client.chat.completions.create(
        model="triage", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    ).choices[0]
    content = with_logprobs.logprobs.content
    assert len(content) >= 1 and "".join(t.token for t in content) == with_logprobs.message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob == t.top_logprobs[0].logprob
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    base_dir = next(line.split(": ", 1)[1].strip() for line in (run / "config.yaml").read_text().splitlines() if "name:" in line)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run / "adapter").eval()
    history = [{"role": "system", "content": SYSTEM}, *messages]  # the run's training system prompt, as the server adds it
    enc = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        first = model(**enc).logits[0, -1].float().log_softmax(-1)
    assert abs(float(first.max()) - content[0].logprob) < 1e-3
