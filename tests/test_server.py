"""`anemll-fast serve`: the real server process on a loopback port, driven by the official `openai` client."""
import json
import re

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")

from anemll_fast.testing.tiny import build_tiny_model  # noqa: E402
from assets import qwen3_tokenizer_dir  # noqa: E402
from serving import ServerProcess  # noqa: E402

CONTEXT = 512


def qwen3_tiny(path, tokenizer_dir, **kw):
    """A tiny random Qwen3 with the real Qwen3 tokenizer and chat template (tools in the
    Hermes format, `<tool_call>` as added tokens): a real BPE vocabulary for the grammar."""
    import shutil

    from anemll_fast.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_dir).vocab_size
    m = build_tiny_model(path, "qwen3", vocab_size=vocab, split_lm_head=1, **kw)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, m.path / f.name)
    (m.path / "special_tokens_map.json").unlink(missing_ok=True)
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_models")
    a = qwen3_tiny(root / "a", qwen3_tokenizer_dir(), context_length=CONTEXT, batch_size=64, seed=0, hidden_size=32,
                   num_heads=2, num_kv_heads=1, intermediate_size=64, num_layers=1)
    # A second model (byte-level tokenizer, ChatML without tools) for model switching.
    b = build_tiny_model(root / "b", context_length=128, batch_size=16, vocab_size=384, seed=1)
    return a, b


@pytest.fixture(scope="module")
def server(models):
    a, b = models
    proc = ServerProcess(["--model", f"tiny={a.path}", "--model", f"other={b.path}", "--max-queue", "8",
                          "--max-body-mb", "0.25"])
    yield proc
    log = proc.stop()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


HI = [{"role": "user", "content": "Hello there"}]


def test_models_health_and_unknown_model(client, http):
    assert [m.id for m in client.models.list().data] == ["tiny", "other"]
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["resident"] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="missing", messages=HI, max_tokens=2)
    assert "tiny" in str(err.value) and "other" in str(err.value)
    assert err.value.body["param"] == "model"


def test_chat_completion_reproducible_with_usage_and_cache(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me about the sea"}], max_tokens=12,
              temperature=0.9, top_p=0.95, seed=7)
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].finish_reason in ("stop", "length")
    u = again.usage
    assert u.completion_tokens == 12 or again.choices[0].finish_reason == "stop"
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # The same prompt again: every prompt token was in the KV cache.
    assert u.prompt_tokens_details.cached_tokens == u.prompt_tokens
    other_seed = client.chat.completions.create(**{**kw, "seed": 8})
    assert other_seed.choices[0].message.content != first.choices[0].message.content


def test_a_growing_chat_prefills_only_the_new_turn(client):
    msgs = [{"role": "user", "content": "One"}]
    r1 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": [{"type": "text", "text": "Two"}]}]
    r2 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r1.usage.prompt_tokens <= cached < r2.usage.prompt_tokens
    r3 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, extra_body={"cache_prompt": False})
    assert r3.usage.prompt_tokens_details.cached_tokens == 0


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kw = dict(model="tiny", messages=HI, max_tokens=20, temperature=0.8, seed=3)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_text_ids_and_stream(client, models):
    from anemll_fast.tokenizer import Tokenizer

    kw = dict(model="tiny", max_tokens=8, temperature=0.7, seed=5)
    by_text = client.completions.create(prompt="Once upon a time", **kw)
    ids = Tokenizer(models[0].path).encode("Once upon a time")
    by_ids = client.completions.create(prompt=ids, **kw)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt="Once upon a time", stream=True,
                                                                            **kw) if c.choices)
    assert streamed == by_text.choices[0].text
    default = client.completions.create(model="tiny", prompt="abc", stop=None)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_logprobs_chat_and_completion(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert entry.logprob == pytest.approx(tops[0])  # greedy: the chosen token is the best one
        assert entry.token == entry.top_logprobs[0].token
    c = client.completions.create(model="tiny", prompt="abc", max_tokens=4, logprobs=2, temperature=1.0, seed=1)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "Who are you?", "{", "Write a poem", "Return JSON only", "42", "Name?", "x"]


def test_json_schema_output_is_always_valid(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for i, prompt in enumerate(PROMPTS):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=200, temperature=1.0, seed=i, response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_schema_negative_control(client):
    # Without the grammar the same random model does not produce valid JSON.
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                       max_tokens=60, temperature=1.0, seed=0)
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)


def test_json_object_and_streamed_json_schema(client, models):
    from anemll_fast.tokenizer import Tokenizer

    # A bias towards '"' and '}' lets the random model close strings and the object soon.
    tok = Tokenizer(models[0].path)
    bias = {str(tok.token_to_id(t)): 10 for t in ('"', "}", '":', '"}')}
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=100, temperature=0.5, seed=2,
                                       response_format={"type": "json_object"}, logit_bias=bias)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=200, temperature=1.0, seed=11, response_format=fmt, stream=True)
        if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


INT = {"type": "integer", "minimum": 0, "maximum": 999}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": INT, "b": INT}, "required": ["a", "b"],
                       "additionalProperties": False}}},
]


def _params(name):
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_tool_choice_forces_a_valid_call_and_the_reply_round_trips(client, choice):
    msgs = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice=choice,
                                           max_tokens=150, temperature=1.0, seed=seed)
        choice0 = r.choices[0]
        assert choice0.finish_reason == "tool_calls", choice0.message.content
        call = choice0.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), _params(call.function.name))
    # The call and its result go back as OpenAI messages (content None with tool_calls).
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=5)
    assert r2.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call(client):
    stream = client.chat.completions.create(model="tiny", messages=HI, tools=TOOLS, tool_choice="required",
                                            max_tokens=150, temperature=1.0, seed=4, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()
    jsonschema.validate(json.loads(calls[0].function.arguments), _params(calls[0].function.name))


def test_tools_auto_with_a_model_that_does_not_call_is_plain_content(client):
    r = client.chat.completions.create(model="tiny", messages=HI, tools=TOOLS, max_tokens=10, temperature=1.0, seed=1)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    none = client.chat.completions.create(model="tiny", messages=HI, tools=TOOLS, tool_choice="none", max_tokens=3)
    assert none.usage.prompt_tokens < r.usage.prompt_tokens  # tool_choice none: no tools in the prompt


def test_model_swap_keeps_one_resident(client, http):
    a1 = client.completions.create(model="tiny", prompt="abc", max_tokens=6)
    b = client.completions.create(model="other", prompt="abc", max_tokens=6)
    assert b.model == "other" and http.get("/health").json()["resident"] == ["other"]
    a2 = client.completions.create(model="tiny", prompt="abc", max_tokens=6)
    assert a2.choices[0].text == a1.choices[0].text
    assert http.get("/health").json()["resident"] == ["tiny"]


LONG = " ".join(str(i) for i in range(400))  # over the context in any tokenizer
BAD = [
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": HI, "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": HI, "max_tokens": CONTEXT + 1}, 400, "max_tokens"),
    ({"messages": HI, "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": HI, "temperature": -1}, 400, "temperature"),
    ({"messages": HI, "temperature": "hot"}, 400, "temperature"),
    ({"messages": HI, "top_p": 0}, 400, "top_p"),
    ({"messages": HI, "top_p": 1.5}, 400, "top_p"),
    ({"messages": HI, "min_p": 2}, 400, "min_p"),
    ({"messages": HI, "top_k": -1}, 400, "top_k"),
    ({"messages": HI, "top_k": 2**40}, 400, "top_k"),
    ({"messages": HI, "presence_penalty": 5}, 400, "presence_penalty"),
    ({"messages": HI, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"messages": HI, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"messages": HI, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"messages": HI, "logit_bias": {"5": 1000}}, 400, "logit_bias"),
    ({"messages": HI, "n": 2}, 400, "n"),
    ({"messages": HI, "seed": "x"}, 400, "seed"),
    ({"messages": HI, "stop": ""}, 400, "stop"),
    ({"messages": HI, "stop": 5}, 400, "stop"),
    ({"messages": HI, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ({"messages": HI, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": HI, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     "tool_choice"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": ""}}]}, 400, "tools"),
    ({"messages": HI, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"messages": HI, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"messages": HI, "response_format": {"type": "json_schema",
                                          "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400,
     "response_format"),
    ({"messages": HI, "stream": "yes"}, 400, "stream"),
    ({"messages": HI, "chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs"),
    ({"messages": HI, "chat_template_kwargs": {"self": 1}}, 400, "chat_template_kwargs"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_chat_requests_name_the_parameter(http, body, status, param):
    r = http.post("/v1/chat/completions", json={"model": "tiny", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


BAD_COMPLETIONS = [
    ({"prompt": [1, 2, 999999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": LONG}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
]


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS, ids=[b[1] + str(i) for i, b in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_requests_name_the_parameter(http, body, param):
    r = http.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_bodies(http):
    for content, ctype in [(b"{not json", "application/json"), (b"", "application/json"), (b"[1, 2]", "application/json"),
                           (b"\xff\xfe", "application/json"), (b"null", "application/json")]:
        r = http.post("/v1/chat/completions", content=content, headers={"content-type": ctype})
        assert r.status_code == 400, (content, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}
    r = http.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(40):
            yield b"x" * 10_000

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert http.get("/health").status_code == 200


def test_one_log_line_per_request(client, server):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=3)
    line = next(ln for ln in server.log().splitlines() if r.id in ln)
    assert re.search(r"cmpl-\w+ tiny prompt=\d+ cached=\d+ completion=3 [\d.]+ tok/s [\d.]+ s finish=length$", line)


def test_server_survives_everything_above(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures = []
    for path, method in [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET"),
                         ("/health", "GET")]:
        operation = schema[path][method]
        strategy = operation.as_strategy()

        @settings(max_examples=15 if method == "POST" else 3, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            if method == "POST" and isinstance(case.body, dict):
                case.body["max_tokens"] = 4  # keep generations short on the shared machine
                case.body.pop("max_completion_tokens", None)
            response = case.call(base_url=server.url, timeout=60)
            if response.status_code >= 500:
                failures.append((path, case.body, response.status_code, response.text[:300]))

        check()
    assert not failures, failures[:5]


# ------------------------------------------------------------------ under load
KEY = "test-key-123"


@pytest.fixture(scope="module")
def busy_server(models):
    proc = ServerProcess(["--model", f"tiny={models[0].path}", "--max-queue", "2", "--api-key", KEY,
                          "--cors", "http://allowed.example", "--timeout", "120"])
    yield proc
    proc.stop()


def _sse(response):
    """The JSON events of a server-sent event stream, then "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def test_api_key_and_cors(busy_server):
    with httpx.Client(base_url=busy_server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200  # open: for load balancers
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.post("/v1/chat/completions", json={"messages": HI})
        assert r.status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}", "Origin": "http://allowed.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://allowed.example"
        pre = c.options("/v1/chat/completions", headers={"Origin": "http://allowed.example",
                                                          "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        other = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}", "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    client = openai.OpenAI(base_url=busy_server.url + "/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="tiny", messages=HI, max_tokens=2).usage.completion_tokens == 2


def test_cors_is_off_by_default(server, http):
    r = http.get("/v1/models", headers={"Origin": "http://allowed.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.slow
def test_load_concurrent_streams_disconnects_and_queue_limits(busy_server):
    import threading
    import time

    import psutil

    headers = {"Authorization": f"Bearer {KEY}"}
    lock = threading.Lock()
    done = {}  # request key -> text of a completed stream
    statuses = []
    cancelled = []  # (request id, chunks read) of streams closed early

    def body(client_no, i):
        long = (client_no + i) % 3 == 0  # abandoned after two chunks, with the prompt cache on
        # The others prefill from scratch (cache_prompt false), to be reproducible bit for bit.
        return {"model": "tiny", "messages": [{"role": "user", "content": f"Client {client_no} asks question {i}"}],
                "max_tokens": 200 if long else 16, "temperature": 0.8, "seed": 100 * client_no + i, "stream": True,
                "cache_prompt": long}

    def run_client(client_no, deadline):
        with httpx.Client(base_url=busy_server.url, timeout=60, headers=headers) as c:
            i = 0
            while time.monotonic() < deadline and i < 6:
                req = body(client_no, i)
                disconnect = req["max_tokens"] == 200  # the long ones are abandoned after two chunks
                with c.stream("POST", "/v1/chat/completions", json=req) as r:
                    with lock:
                        statuses.append(r.status_code)
                    if r.status_code == 429:
                        assert r.headers.get("retry-after") == "1"
                        time.sleep(0.05)
                        continue
                    assert r.status_code == 200, r.read()
                    text, n = "", 0
                    for event in _sse(r):
                        if event == "[DONE]":
                            break
                        assert "error" not in event, event
                        n += 1
                        if event["choices"]:
                            text += event["choices"][0]["delta"].get("content") or ""
                        if disconnect and n == 2:
                            with lock:
                                cancelled.append((event["id"], n))
                            break
                    else:
                        raise AssertionError("the stream ended without [DONE]")
                    if not disconnect:
                        with lock:
                            done[(client_no, i)] = text
                i += 1

    def round_of_load(seconds):
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=run_client, args=(k, deadline)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 120)
        assert not any(t.is_alive() for t in threads)

    server_proc = psutil.Process(busy_server.pid)
    round_of_load(3)  # warm-up: allocator pools, caches
    rss_warm = server_proc.memory_info().rss
    round_of_load(6)
    rss_after = server_proc.memory_info().rss

    assert 500 not in statuses and set(statuses) <= {200, 429}
    assert 429 in statuses  # 8 clients against one running + two waiting
    assert len(done) >= 8 and cancelled
    # Every completed stream equals the same request run alone.
    with httpx.Client(base_url=busy_server.url, timeout=60, headers=headers) as c:
        for (client_no, i), text in sorted(done.items()):
            alone = c.post("/v1/chat/completions", json={**body(client_no, i), "stream": False})
            assert alone.status_code == 200
            assert alone.json()["choices"][0]["message"]["content"] == text, (client_no, i)
        deadline = time.monotonic() + 10
        while c.get("/health").json()["queue"] and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker's bookkeeping ends just after the last response
        assert c.get("/health").json()["queue"] == 0
    assert rss_after - rss_warm < 40 * 2**20, (rss_warm, rss_after)
    # A client that left stopped its generation long before its 200 tokens.
    log = busy_server.log()
    for rid, read in cancelled:
        line = next(ln for ln in log.splitlines() if rid in ln and "cancelled after" in ln)
        assert int(line.split("cancelled after ")[1].split()[0]) < 100, line
