"""nima-edge serve: the OpenAI-compatible API on a real uvicorn server over loopback, its bad-request
classes, auth, CORS, the Host check, queueing and per-request cancellation, and the official openai client.

The models are tiny_ckpt exported to GGUF (the llama.cpp runtime) and the checkpoint itself (the PyTorch
runtime); test_every_runtime_answers adds ExecuTorch. Expected replies come from the same artifact
loaded separately and driven by nima_edge.chat.Conversation / Runtime.generate_ids, i.e. what
`nima-edge chat` and `generate` print.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[gguf]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

from serve_support import LiveServer, chat_text, slowed, wait_for  # noqa: E402

from nima_edge.chat import Conversation  # noqa: E402
from nima_edge.export import export  # noqa: E402
from nima_edge.runtimes import load_runtime  # noqa: E402
from nima_edge.sampling import Sampling  # noqa: E402
from nima_edge.serve.app import Limits, Settings  # noqa: E402
from nima_edge.serve.launch import exposure_warning  # noqa: E402

NIMA_EDGE = Path(sys.executable).with_name("nima-edge")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Good morrow"}]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CAP = 200  # the server's max_tokens limit in these tests


@pytest.fixture(scope="module")
def model_gguf(tmp_path_factory, tiny_ckpt) -> Path:
    return export(tiny_ckpt, "gguf", tmp_path_factory.mktemp("serve") / "tiny.gguf", "q8_0")


@pytest.fixture(scope="module")
def server(model_gguf, tiny_ckpt):
    live = LiveServer({"tiny": load_runtime(model_gguf), "tiny-torch": load_runtime(tiny_ckpt)},
                      Settings(allowed_hosts=LOOPBACK, limits=Limits(queue_size=4, max_body_bytes=64 * 1024,
                                                                     max_tokens=CAP)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reference(model_gguf):
    rt = load_runtime(model_gguf)
    yield rt
    rt.close()


def greedy_chat(rt, messages: list[dict], max_new: int) -> str:
    """What `nima-edge chat` answers for this conversation at temperature 0."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    history = [dict(m) for m in messages[1 if system else 0:-1]]
    convo = Conversation(rt, system, max_new, Sampling(), history=history)
    return "".join(convo.reply(messages[-1]["content"]))


# --- the API --------------------------------------------------------------------------------------------

def test_health_models_and_page(server):
    status, _, body = server.request("GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = server.request("GET", "/v1/models")
    cards = {m["id"]: m for m in json.loads(body)["data"]}
    assert cards["tiny"]["target"] == "gguf" and cards["tiny-torch"]["target"] == "torch"
    assert cards["tiny"]["context_length"] == 256 and cards["tiny"]["max_tokens"] == CAP
    status, headers, body = server.request("GET", "/")
    assert status == 200 and b'<script src="/static/chat.js"' in body
    assert "script-src 'self'" in headers["content-security-policy"]  # no inline or third-party script runs
    status, headers, _ = server.request("GET", "/static/chat.js")
    assert status == 200 and "javascript" in headers["content-type"]


def test_chat_completion_is_what_the_terminal_chat_says(server, reference):
    status, answer = server.post("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 20,
                                                          "temperature": 0})
    assert status == 200, answer
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == greedy_chat(reference, MESSAGES, 20)
    usage = answer["usage"]
    prompt_ids = Conversation(reference, "Be brief.", 1, history=[MESSAGES[1]]).prompt_ids()
    assert usage["prompt_tokens"] == len(prompt_ids) == answer["nima_context"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 20 else "stop")
    assert answer["timings"]["predicted_n"] == usage["completion_tokens"]


def test_stream_carries_the_same_reply_in_openai_framing(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 30, "temperature": 0}
    _, whole = server.post("/v1/chat/completions", body)
    sse = server.open_stream("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert sse.status == 200 and sse.response.getheader("content-type").startswith("text/event-stream")
    text, chunks = chat_text(sse.events())
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[-1] == "[DONE]"
    last_content = [c for c in chunks[:-1] if c["choices"]][-1]
    assert last_content["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_completion_stops_at_a_stop_string(server, reference):
    prompt = "ROMEO:\nWhat light"
    full = reference.detokenize(list(reference.generate_ids(reference.tokenize(prompt), 40, Sampling())))
    assert len(full) > 8, full
    stop = full[5:7]  # a string the greedy continuation is known to contain
    status, answer = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 40,
                                                     "temperature": 0, "stop": [stop, "\x00never"]})
    assert status == 200, answer
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == full[:full.index(stop)]
    assert answer["choices"][0]["finish_reason"] == "stop"
    # streamed, the stop string is held back across pieces the same way
    sse = server.open_stream("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 40,
                                                 "temperature": 0, "stop": stop})
    streamed = "".join(c["choices"][0]["text"] for c in sse.events() if c != "[DONE]")
    assert streamed == full[:full.index(stop)]


def test_sampling_options_reach_the_sampler(server):
    body = {"model": "tiny-torch", "prompt": "KING:", "max_tokens": 30, "temperature": 1.2, "top_k": 50,
            "top_p": 0.9, "ignore_eos": True}
    texts = [server.post("/v1/completions", {**body, "seed": seed})[1]["choices"][0]["text"] for seed in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]  # the seed decides; a different seed differs
    status, answer = server.post("/v1/completions", {**body, "seed": 1})
    assert answer["usage"]["completion_tokens"] == 30 and answer["choices"][0]["finish_reason"] == "length"


def test_fit_context_drops_the_oldest_turns_and_strict_mode_refuses(server):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Speak of matter number {i}, good sir, and tell me more"},
                  {"role": "assistant", "content": "I shall speak of it at length, my lord, by and by."}]
    messages = [{"role": "system", "content": "Be brief."}] + turns + [{"role": "user", "content": "And then?"}]
    status, answer = server.post("/v1/chat/completions", {"messages": messages, "model": "tiny", "max_tokens": 50,
                                                          "temperature": 0, "fit_context": True})
    assert status == 200, answer
    ctx = answer["nima_context"]
    assert ctx["dropped_messages"] > 0 and ctx["prompt_tokens"] <= 256 - 50
    status, error = server.post("/v1/chat/completions", {"messages": messages, "model": "tiny", "max_tokens": 50})
    assert status == 400 and error["error"]["code"] == "context_length_exceeded"


# --- bad requests: each class gets a 4xx in OpenAI's error shape -----------------------------------------

OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_REQUESTS = [
    # (route, body, status, param or None, words in the message)
    ("/v1/chat/completions", b'{"messages": [', 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"\xff\xfe", 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "required"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", "'user'"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", ""),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("/v1/chat/completions", {**OK_CHAT, "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/chat/completions", {**OK_CHAT, "top_k": -1}, 400, "top_k", ""),
    ("/v1/chat/completions", {**OK_CHAT, "seed": 1.5}, 400, "seed", "integer"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens", ""),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": CAP + 1}, 400, "max_tokens", f"({CAP})"),
    ("/v1/chat/completions", {**OK_CHAT, "stream": "yes"}, 400, "stream", "boolean"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": [""]}, 400, "stop", "empty"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 2}, 400, "n", "n=1"),
    ("/v1/chat/completions", {**OK_CHAT, "logprobs": True}, 400, "logprobs", "not supported"),
    ("/v1/chat/completions", {**OK_CHAT, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("/v1/chat/completions", {**OK_CHAT, "model": "gpt-4"}, 404, "model", "not served here"),
    ("/v1/chat/completions", {**OK_CHAT, "model": None}, 404, "model", "not served here"),  # two models here
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": "x" * 600}]}, 400, "messages",
     "context"),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * 300}, 400, "prompt", "context"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 99999]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "echo": True}, 400, "echo", "not supported"),
    ("/v1/chat/completions", b'{"pad": "' + b"x" * 70_000 + b'"}', 413, None, "larger than"),
]


@pytest.mark.parametrize("route,body,status,param,words", BAD_REQUESTS,
                         ids=[f"{i}-{r[3] or r[4]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_request(server, route, body, status, param, words):
    got, headers, raw = server.request("POST", route, body)
    error = json.loads(raw)["error"]
    assert got == status, error
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert error["param"] == param
    assert headers["content-type"] == "application/json"


def test_unknown_route_and_wrong_method(server):
    status, _, raw = server.request("GET", "/v1/chat/completions")
    assert status == 405 and json.loads(raw)["error"]["message"].startswith("GET /v1/chat/completions")
    status, _, raw = server.request("POST", "/v1/embeddings", {"input": "x"})
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


# --- concurrency: a bounded queue, and cancellation of one's own generation only ------------------------

@pytest.fixture()
def slow_server(model_gguf):
    """One slowed GGUF model (20 ms per decoded token), one waiting slot."""
    from nima_edge.runtimes.gguf import LlamaCppRuntime
    live = LiveServer({"slow": slowed(LlamaCppRuntime, decode_s=0.02)(model_gguf)},
                      Settings(allowed_hosts=LOOPBACK, limits=Limits(queue_size=1, max_tokens=CAP)))
    yield live
    live.stop()


LONG = {"messages": [{"role": "user", "content": "Tell me a long tale"}], "max_tokens": CAP, "temperature": 0,
        "ignore_eos": True}


def test_disconnect_cancels_only_its_own_generation(slow_server, reference):
    worker = slow_server.workers["slow"]
    a = slow_server.open_stream("/v1/chat/completions", LONG)  # 200 tokens x 20 ms: runs ~4 s
    events = a.events()
    next(events), next(events)  # role chunk, first token: A is generating
    results = {}
    b_body = {"messages": MESSAGES, "max_tokens": 25, "temperature": 0}
    b = threading.Thread(target=lambda: results.update(b=chat_text(
        slow_server.open_stream("/v1/chat/completions", b_body).events())))
    b.start()
    wait_for(lambda: worker.waiting == 1, what="B to queue behind A")
    # the queue is full now: a third client is told to come back later
    status, headers, raw = slow_server.request("POST", "/v1/chat/completions", {**b_body, "stream": True})
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert json.loads(raw)["error"]["code"] == "queue_full"
    a.drop()
    b.join(timeout=60)
    text, chunks = results["b"]
    assert chunks[-1] == "[DONE]" and text == greedy_chat(reference, MESSAGES, 25)  # B is whole and correct
    assert worker.stats["cancelled"] == 1 and worker.stats["completed"] == 1 and worker.stats["rejected"] == 1


def test_a_client_that_leaves_while_queued_never_runs(slow_server):
    worker = slow_server.workers["slow"]
    a = slow_server.open_stream("/v1/chat/completions", {**LONG, "max_tokens": 100})  # ~2 s
    next(a.events())
    queued = slow_server.open_stream("/v1/chat/completions", LONG)  # waits behind A
    wait_for(lambda: worker.waiting == 1, what="the second request to queue")
    queued.drop()
    text, chunks = chat_text(a.events())
    assert chunks[-1] == "[DONE]"
    wait_for(lambda: worker.stats["left_queue"] == 1 and worker.waiting == 0, what="the queued job to be skipped")
    assert worker.stats["completed"] == 1 and worker.stats["cancelled"] == 0  # the dropped request never ran


def test_unstreamed_request_is_cancelled_by_its_disconnect(slow_server):
    import socket
    worker = slow_server.workers["slow"]
    body = json.dumps({**LONG, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", slow_server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: worker.busy, what="the generation to start")
    wait_for(lambda: worker.stats["cancelled"] == 1 and not worker.busy, timeout=10, what="the cancellation")


# --- safety: API key, CORS, Host check ------------------------------------------------------------------

def test_api_key_guards_the_api_only(model_gguf):
    live = LiveServer({"tiny": load_runtime(model_gguf)}, Settings(api_key="s3cret", allowed_hosts=LOOPBACK))
    try:
        status, headers, raw = live.request("GET", "/v1/models")
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        assert headers["www-authenticate"] == "Bearer"
        assert live.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert live.request("POST", "/v1/chat/completions", OK_CHAT)[0] == 401
        assert live.request("GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert live.request("GET", "/health")[0] == 200 and live.request("GET", "/")[0] == 200
    finally:
        live.stop()


def test_cors_is_off_unless_origins_are_given(server, model_gguf):
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in headers
    _, headers, _ = server.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers
    live = LiveServer({"tiny": load_runtime(model_gguf)},
                      Settings(api_key="k", cors_origins=["http://app.example"], allowed_hosts=LOOPBACK))
    try:
        status, headers, _ = live.request("OPTIONS", "/v1/chat/completions",
                                          headers={**preflight, "Origin": "http://app.example"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-credentials" not in headers
        status, headers, _ = live.request("OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 400 and "access-control-allow-origin" not in headers
        # a 401 still carries the CORS header, so the allowed page can read why
        status, headers, _ = live.request("GET", "/v1/models", headers={"Origin": "http://app.example"})
        assert status == 401 and headers["access-control-allow-origin"] == "http://app.example"
    finally:
        live.stop()


@pytest.mark.parametrize("host,allowed", [("127.0.0.1:8000", True), ("localhost", True), ("[::1]:80", True),
                                          ("evil.example", False), ("evil.example:8000", False),
                                          ("127.0.0.1.evil.example", False)])
def test_host_header_is_checked_on_loopback(server, host, allowed):
    status, _, raw = server.request("GET", "/v1/models", headers={"Host": host})
    assert status == (200 if allowed else 403), raw
    if not allowed:
        assert json.loads(raw)["error"]["code"] == "host_not_allowed"
        assert server.request("GET", "/", headers={"Host": host})[0] == 403  # the page too


def test_binding_beyond_loopback_without_a_key_warns():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)


def _start_cli(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(NIMA_EDGE), "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "serving on http://" in line:
            return proc, line.split("http://", 1)[1].split("/", 1)[0]
    raise AssertionError("server exited: " + "".join(lines))


@pytest.mark.parametrize("source", ["env", "file"])
def test_cli_reads_the_key_from_env_or_file_never_argv(model_gguf, tmp_path, source):
    import urllib.error
    import urllib.request
    key = "k-" + source * 3
    if source == "env":
        args, env = [str(model_gguf)], {"NIMA_EDGE_API_KEY": key}
    else:
        (tmp_path / "key").write_text(key + "\n")
        args, env = [str(model_gguf), "--api-key-file", str(tmp_path / "key")], {"NIMA_EDGE_API_KEY": ""}
    proc, hostport = _start_cli(args, env)
    try:
        assert key not in Path(f"/proc/{proc.pid}/cmdline").read_text()  # what `ps` shows
        url = f"http://{hostport}/v1/models"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 401
        ok = urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"}),
                                    timeout=10)
        assert json.loads(ok.read())["data"][0]["id"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("args,words", [(["missing.gguf"], "does not exist"),
                                        (["{gguf}", "--queue-size", "-1"], "--queue-size"),
                                        (["{gguf}", "--api-key-file", "/nonexistent/key"], "API key file"),
                                        (["{gguf}", "{gguf}"], "both be called")])
def test_cli_bad_input_is_one_line_and_exit_2(model_gguf, args, words, monkeypatch, capsys):
    from nima_edge.cli import main
    monkeypatch.setattr(sys, "argv", ["nima-edge", "serve", *[a.format(gguf=model_gguf) for a in args], "--port", "0"])
    with pytest.raises(SystemExit) as e:
        main()  # in-process: the same entry point as the installed command, without its start-up time
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert words in err and "Traceback" not in err


# --- the official openai client -------------------------------------------------------------------------

def test_openai_client(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"tiny", "tiny-torch"}
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == greedy_chat(reference, MESSAGES, 20)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    done = client.completions.create(model="tiny-torch", prompt="ROMEO:", max_tokens=10, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.prompt_tokens == 7
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="x" * 400, max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_every_runtime_answers(tiny_ckpt, tiny_pte, model_gguf):
    """The same greedy conversation through each runtime this machine has (here: gguf, torch, executorch)."""
    paths = {"gguf": model_gguf, "torch": tiny_ckpt, "executorch": tiny_pte}
    live = LiveServer({name: load_runtime(p) for name, p in paths.items()}, Settings(allowed_hosts=LOOPBACK))
    try:
        for name, path in paths.items():
            status, answer = live.post("/v1/chat/completions", {"model": name, "messages": MESSAGES,
                                                                "max_tokens": 15, "temperature": 0})
            assert status == 200, answer
            rt = load_runtime(path)
            try:
                assert answer["choices"][0]["message"]["content"] == greedy_chat(rt, MESSAGES, 15), name
            finally:
                rt.close()
    finally:
        live.stop()


@pytest.mark.slow
@pytest.mark.parametrize("target,quant,name", [("onnx", "f32", "tiny-onnx"), ("onnx-portable", "f32", "tiny.onnx")])
def test_onnx_runtimes_answer(tiny_ckpt, tmp_path, target, quant, name):
    """As test_every_runtime_answers, for the two ONNX runtimes (their exports take a while: slow)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    path = export(tiny_ckpt, target, tmp_path / name, quant)
    live = LiveServer({"m": load_runtime(path)}, Settings(allowed_hosts=LOOPBACK))
    try:
        status, answer = live.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 15, "temperature": 0})
        assert status == 200, answer
    finally:
        live.stop()
    rt = load_runtime(path)
    try:
        assert answer["choices"][0]["message"]["content"] == greedy_chat(rt, MESSAGES, 15)
    finally:
        rt.close()
