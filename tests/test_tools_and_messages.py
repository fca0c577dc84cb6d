"""OpenAI chat messages and tools in chat templates; tool calls parsed from model-style output."""
import json

import pytest

from anemll_fast.chat_template import TemplateError, check_messages, render
from anemll_fast.tokenizer import Tokenizer
from anemll_fast.tool_calls import ToolCallStream, detect_format, parse
from assets import qwen3_tokenizer_dir

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NAMES = ["get_weather", "add"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def qwen():
    return Tokenizer(qwen3_tokenizer_dir())


# ------------------------------------------------------------------ messages
def test_content_parts_none_with_tool_calls_and_developer_role():
    msgs = check_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ])
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["content"] == "Weather in Paris?"
    assert msgs[2]["content"] == "" and msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[3]["tool_call_id"] == "c1"


@pytest.mark.parametrize("message, match", [
    ({"role": "user", "content": None}, r"messages\[0\].content must be a string or a list"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     r"messages\[0\].content\[0\].type: only text parts"),
    ({"role": "user", "content": [{"type": "text", "text": 3}]}, r"content\[0\].text must be a string"),
    ({"role": "user", "content": [5]}, r"content\[0\] must be a content part object"),
    ({"role": "user", "content": "x", "tool_calls": []}, "only assistant messages carry tool calls"),
    ({"role": "assistant", "content": None, "tool_calls": "x"}, "tool_calls must be a list"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
     r"tool_calls\[0\].function.name"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}, r"tool_calls\[0\].function must be"),
])
def test_bad_messages_name_the_field(message, match):
    with pytest.raises(TemplateError, match=match):
        check_messages([message])


def test_qwen3_template_gets_tools_and_renders_a_tool_round_trip(qwen):
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = render(qwen.chat_template, msgs, tools=[WEATHER], enable_thinking=False)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    # Arguments rendered once as JSON (a string would be quoted twice).
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render(qwen.chat_template, msgs[:1]) == render(qwen.chat_template, msgs[:1], tools=[])


def test_template_without_tools_gets_them_as_a_system_prompt():
    text = render(CHATML, [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}], tools=[WEATHER])
    assert text.startswith("<|im_start|>system\nBe nice.\n\n# Tools")
    assert '"name": "get_weather"' in text and "<tool_call>" in text
    text = render(CHATML, [{"role": "user", "content": "Hi"}], tools=[WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools") and text.count("<|im_start|>user\nHi") == 1


@pytest.mark.parametrize("tools, match", [
    ("get_weather", "tools must be a list"),
    ([{"type": "retrieval"}], r"tools\[0\] must be an object with type 'function'"),
    ([{"type": "function", "function": {"name": ""}}], r"tools\[0\].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], r"tools\[0\].function.parameters"),
])
def test_bad_tools_name_the_field(tools, match):
    with pytest.raises(TemplateError, match=match):
        render(CHATML, [{"role": "user", "content": "Hi"}], tools=tools)


def test_template_kwargs_reach_the_template():
    t = "{{ greeting }} {{ messages[0].content }}"
    assert render(t, [{"role": "user", "content": "x"}], greeting="hello") == "hello x"


# ---------------------------------------------------------------- tool calls
def test_detect_format(qwen):
    assert detect_format(qwen.chat_template) == "hermes"
    llama = "{{- '<|start_header_id|>' }}{%- if tools %}{\"name\": function name, \"parameters\": ...}<|eot_id|>"
    assert detect_format(llama + "<|python_tag|>") == "llama3_json"
    assert detect_format(llama) == "llama3_json"
    assert detect_format(CHATML) == "hermes" and detect_format(None) == "hermes"


def _args(call):
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_parse_qwen_hermes_calls():
    text = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    content, calls = parse(text, "hermes", NAMES)
    assert content == "I will check."
    assert [_args(c) for c in calls] == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    # Unterminated last block (generation ended at the end-of-turn token), arguments as a JSON string.
    content, calls = parse('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 5, \\"b\\": 6}"}', "hermes", NAMES)
    assert content is None and [_args(c) for c in calls] == [("add", {"a": 5, "b": 6})]


def test_parse_llama3_json_calls():
    content, calls = parse('{"name": "get_weather", "parameters": {"city": "Rome"}}', "llama3_json", NAMES)
    assert content is None and [_args(c) for c in calls] == [("get_weather", {"city": "Rome"})]
    _, calls = parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 1}}; '
                     '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "llama3_json", NAMES)
    assert [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    _, calls = parse('[{"name": "add", "arguments": {"a": 0, "b": 0}}]', "llama3_json", NAMES)
    assert [_args(c) for c in calls] == [("add", {"a": 0, "b": 0})]


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',  # broken JSON
    '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # not an offered tool
    '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n["add"]\n</tool_call>',
    '{"name": "add", "parameters": {"a": 1}',  # truncated
    '{"answer": 42}',  # JSON, but no call
    "<tool_call>",
])
def test_unparseable_or_unknown_calls_stay_plain_content(text):
    for fmt in ("hermes", "llama3_json"):
        assert parse(text, fmt, NAMES) == (text, [])
    assert parse(text, "hermes", []) == (text, [])  # no tools offered: never calls


def test_stream_releases_content_and_holds_back_calls():
    pieces = ["Let me ", "check <", "tool", "_call>\n{\"name\": \"add\", ", "\"arguments\": {\"a\": 1, \"b\": 2}}",
              "\n</tool_call>"]
    s = ToolCallStream("hermes", NAMES)
    out = [s.feed(p) for p in pieces]
    assert out[0] == "Let me " and "".join(out) == "Let me check "
    rest, calls = s.finish()
    assert rest == "" and [_args(c) for c in calls] == [("add", {"a": 1, "b": 2})]
    # A '<' that is no call is released once it cannot start one.
    s = ToolCallStream("hermes", NAMES)
    assert s.feed("a <") == "a " and s.feed("b") == "<b" and s.finish() == ("", [])
    # A bare JSON reply (Llama 3) is held whole; if it is no call it comes out at the end.
    s = ToolCallStream("llama3_json", NAMES)
    assert s.feed("  ") == "" and s.feed('{"x": ') == "" and s.feed("1}") == ""
    assert s.finish() == ('  {"x": 1}', [])
    s = ToolCallStream("hermes", [])
    assert s.feed("<tool_call>") == "<tool_call>"  # no tools: everything is content


# ------------------------------------------------------------------- grammar
def test_forced_call_grammar_on_qwen_tokens(qwen):
    pytest.importorskip("llguidance")
    from anemll_fast.grammar import GrammarError
    from anemll_fast.tool_calls import forced_call_grammar

    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}}
    g = forced_call_grammar(qwen, "hermes", [WEATHER, add], "add")
    good = '<tool_call>\n{"name": "add", "arguments": {"a": 7}}\n</tool_call>'
    ids = qwen.encode(good)
    assert ids[0] == qwen.token_to_id("<tool_call>")  # matched as Qwen's added token
    for t in ids:
        g.fill_mask()
        assert g.allowed(t), qwen.decode([t])
        g.accept(t)
    g.fill_mask()
    assert g.done and {t for t in qwen.eos_token_ids if g.allowed(t)} == qwen.eos_token_ids
    g = forced_call_grammar(qwen, "hermes", [WEATHER, add], "add")
    bad = qwen.encode('<tool_call>\n{"name": "get_weather"')
    with pytest.raises(GrammarError, match="not allowed"):
        for t in bad:
            g.fill_mask()
            g.accept(t)
    with pytest.raises(GrammarError, match="no tool named 'nope'"):
        forced_call_grammar(qwen, "hermes", [WEATHER], "nope")
    g = forced_call_grammar(qwen, "llama3_json", [add], None)
    for t in qwen.encode('{"name": "add", "parameters": {"a": 1}}'):
        g.fill_mask()
        g.accept(t)
    assert g.done


def test_response_format_errors(qwen):
    pytest.importorskip("llguidance")
    from anemll_fast.grammar import Grammar, GrammarError

    assert Grammar.from_response_format(qwen, None) is None
    assert Grammar.from_response_format(qwen, {"type": "text"}) is None
    for fmt, match in [({"type": "yaml"}, "response_format.type"), ("json", "expected an object"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"schema": []}}, "must be a JSON object"),
                       ({"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}, "json_schema")]:
        with pytest.raises(GrammarError, match=match):
            Grammar.from_response_format(qwen, fmt)
    # Non-strict: unknown keywords are ignored instead of refused.
    schema = {"type": "object", "properties": {"a": {"type": "string", "x-unknown-keyword": 1, "format": "uuid"}}}
    Grammar.from_response_format(qwen, {"type": "json_schema", "json_schema": {"schema": schema, "strict": False}})


# ------------------------------------------------------------------ serve CLI
def test_serve_cli_checks_its_arguments_before_loading(capsys, tmp_path):
    from anemll_fast.cli import main

    for argv, match in [(["--port", "70000"], "--port"), (["--max-queue", "-1"], "--max-queue"),
                        (["--max-models", "0"], "--max-models"), (["--timeout", "0"], "--timeout"),
                        (["--model", "a=x", "--model", "a=y"], "given twice"), (["--model", "=x"], "ALIAS=PATH")]:
        assert main(["serve", *argv]) == 2
        assert match in capsys.readouterr().err
    missing = tmp_path / "no-such-model"
    assert main(["serve", "--host", "0.0.0.0", "--model", str(missing), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0 exposes the server beyond this machine with no --api-key" in err
    assert "no-such-model" in err


def test_model_specs_and_pool_resolution():
    from anemll_fast.server.pool import DEFAULT_ID, ModelPool, UnknownModel, parse_model_args

    specs = parse_model_args(["qwen=/models/qwen3/", "/models/llama/"])
    assert [(s.id, s.source) for s in specs] == [("qwen", "/models/qwen3/"), ("/models/llama", "/models/llama/")]
    assert parse_model_args([])[0].id == DEFAULT_ID and parse_model_args([])[0].source is None
    loaded, closed = [], []

    class Fake:
        def __init__(self, source):
            self.source = source
            loaded.append(source)

        def close(self):
            closed.append(self.source)

    pool = ModelPool(specs, max_models=1, loader=Fake)
    assert pool.resolve(None).id == "qwen" and pool.resolve("/models/qwen3/").id == "qwen"
    with pytest.raises(UnknownModel, match="known models: qwen, /models/llama"):
        pool.resolve("gpt-4")
    first = pool.get(pool.resolve("qwen"))
    assert pool.get(pool.resolve("qwen")) is first and loaded == ["/models/qwen3/"]
    pool.get(pool.resolve("/models/llama"))
    assert closed == ["/models/qwen3/"] and pool.resident() == ["/models/llama"]
    two = ModelPool(specs, max_models=2, loader=Fake)
    two.get(specs[0]), two.get(specs[1])
    assert two.resident() == ["qwen", "/models/llama"]


def test_request_timeouts_in_process(tmp_path):
    """--timeout: a generation running past it is a 504 (the engine stays usable); a request
    still queued when it passes is a 503; both with Retry-After."""
    pytest.importorskip("fastapi")
    import time

    from starlette.testclient import TestClient

    import anemll_fast
    from anemll_fast.server.app import ServerOptions, build_app
    from anemll_fast.server.pool import ModelPool, Worker, parse_model_args
    from anemll_fast.testing.tiny import build_tiny_model

    tiny = build_tiny_model(tmp_path / "m", context_length=256, batch_size=16, vocab_size=300)

    def slow_model(source):
        # Each decode step takes at least 10 ms: 250 tokens outlast the 0.4 s timeout on any machine.
        model = anemll_fast.load(source, backend="reference")
        step = model.engine.step
        model.engine.step = lambda token, pos: (time.sleep(0.01), step(token, pos))[1]
        return model

    pool = ModelPool(parse_model_args([f"t={tiny.path}"]), loader=slow_model)
    worker = Worker(pool, max_queue=4)
    worker.run_sync(lambda: pool.get(pool.specs[0]))
    app = build_app(pool, worker, ServerOptions(timeout=0.4))
    slow = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 250, "cache_prompt": False}
    try:
        with TestClient(app) as c:
            r = c.post("/v1/chat/completions", json=slow)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            assert r.headers["retry-after"] == "1"
            # The engine busy with something that cannot stop (a model loading): the request
            # times out while still queued.
            busy = worker._executor.submit(time.sleep, 1.0)
            queued = c.post("/v1/chat/completions", json={**slow, "max_tokens": 2})
            assert queued.status_code == 503 and queued.json()["error"]["type"] == "timeout_error"
            busy.result()
            ok = c.post("/v1/chat/completions", json={**slow, "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
            deadline = time.monotonic() + 10
            while worker.pending and time.monotonic() < deadline:  # the worker's bookkeeping ends just after
                time.sleep(0.01)
            assert worker.pending == 0
    finally:
        worker.shutdown()
