"""Tokenizer, chat templates and streaming detokenization on the real Qwen3 tokenizer."""
import pytest

from anemll_fast.chat_template import TemplateError, render
from anemll_fast.detokenizer import StreamingDetokenizer
from anemll_fast.tokenizer import Tokenizer, TokenizerError
from assets import qwen3_tokenizer_dir


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(qwen3_tokenizer_dir())


def test_qwen3_tokenizer_metadata(tok):
    assert tok.eos_token == "<|im_end|>"
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.is_end_of_turn(im_end)
    assert tok.token_to_id("<|endoftext|>") in tok.eos_token_ids
    assert tok.vocab_size > 151000
    ids = tok.encode("Hello, world!")
    assert tok.decode(ids) == "Hello, world!"


def test_out_of_vocab_ids(tok):
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([1, -1])
    with pytest.raises(TokenizerError, match=str(10**7)):
        tok.check_ids([10**7])


def test_missing_and_broken_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer(tmp_path)


SYS = {"role": "system", "content": "You are helpful."}
U1 = {"role": "user", "content": "Hi!"}
A1 = {"role": "assistant", "content": "Hello! How can I help?"}
U2 = {"role": "user", "content": "Tell me a joke."}


def test_qwen3_template_single_turn(tok):
    text = render(tok.chat_template, [U1])
    assert text == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_template_no_thinking(tok):
    text = render(tok.chat_template, [U1], enable_thinking=False)
    assert text == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render(tok.chat_template, [U1], enable_thinking=True) == render(tok.chat_template, [U1])


def test_qwen3_template_system_and_multi_turn(tok):
    text = render(tok.chat_template, [SYS, U1, A1, U2])
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a joke.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without the generation prompt, the history ends after the last message.
    assert render(tok.chat_template, [SYS, U1, A1], add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello! How can I help?<|im_end|>\n")


def test_template_bad_messages(tok):
    with pytest.raises(TemplateError, match=r"messages\[1\].role"):
        render(tok.chat_template, [U1, {"role": "robot", "content": "x"}])
    with pytest.raises(TemplateError, match=r"messages\[0\].content"):
        render(tok.chat_template, [{"role": "user", "content": 3}])
    with pytest.raises(TemplateError, match="empty"):
        render(tok.chat_template, [])
    with pytest.raises(TemplateError, match="no chat template"):
        render(None, [U1])
    with pytest.raises(TemplateError, match="does not compile"):
        render("{% for %}", [U1])
    with pytest.raises(TemplateError, match="only users"):
        render("{{ raise_exception('only users') }}", [U1])


def _stream(tok, ids, stop=()):
    d = StreamingDetokenizer(lambda i: tok.decode(i, skip_special_tokens=False), stop)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.finish())
    return pieces, d


def test_streaming_never_breaks_utf8(tok):
    text = "naïve café 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦩🪿🫎 𠜎𠜱 日本語 — done"
    ids = tok.encode(text)
    # Some tokens end inside a character: decoding them alone gives U+FFFD.
    assert any("\ufffd" in tok.decode(ids[: k + 1]) for k in range(len(ids)))
    pieces, d = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == d.text


def test_stop_string_spanning_tokens(tok):
    text = "The answer is 42. END OF ANSWER and more text"
    ids = tok.encode(text)
    pieces, d = _stream(tok, ids, stop=["END OF ANSWER"])
    assert "".join(pieces) == "The answer is 42. "
    assert d.stopped == "END OF ANSWER"
    # Nothing after the stop string comes out, even if more ids arrive.
    assert d.add(ids[0]) == "" and d.finish() == ""


def test_stop_prefix_is_held_back_then_released(tok):
    ids = tok.encode("count: 1, 2, 3 STO")
    pieces, d = _stream(tok, ids, stop=["STOP"])
    joined = "".join(pieces[:-1])
    assert not joined.endswith("STO")  # held back while it could become STOP
    assert joined + pieces[-1] == "count: 1, 2, 3 STO"  # released at the end
    assert d.stopped is None


def test_earliest_of_several_stop_strings(tok):
    ids = tok.encode("alpha beta gamma delta")
    pieces, d = _stream(tok, ids, stop=["delta", "beta"])
    assert "".join(pieces) == "alpha "
    assert d.stopped == "beta"
