"""nima-edge chat: conversation logic, and the real command in a pseudo-terminal (serve: test_serve.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[gguf]')")

from nima_edge.chat import Conversation, render  # noqa: E402
from nima_edge.export import export  # noqa: E402
from nima_edge.runtimes.gguf import LlamaCppRuntime  # noqa: E402
from nima_edge.sampling import Sampling  # noqa: E402

NIMA_EDGE = Path(sys.executable).with_name("nima-edge")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Good morrow"}]


@pytest.fixture(scope="module")
def model_gguf(tmp_path_factory, tiny_ckpt) -> Path:
    return export(tiny_ckpt, "gguf", tmp_path_factory.mktemp("chat") / "tiny.gguf", "q8_0")


def test_template_matches_llama_cpp_python_formatter(model_gguf):
    """Our rendering of CHAT_TEMPLATE equals llama-cpp-python's Jinja formatter reading the GGUF's template."""
    import gguf
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    fields = gguf.GGUFReader(model_gguf).fields
    template = fields["tokenizer.chat_template"].contents()
    formatted = Jinja2ChatFormatter(template, eos_token="<|eos|>", bos_token="<|bos|>")(messages=MESSAGES)
    assert formatted.prompt == render(MESSAGES) == "<|bos|><|system|>Be brief.<|eos|><|user|>Good morrow<|eos|><|assistant|>"


def test_long_conversation_stays_inside_the_context(model_gguf):
    rt = LlamaCppRuntime(model_gguf)
    convo = Conversation(rt, system="Be brief.", max_new_tokens=40, sampling=Sampling())
    for turn in range(8):  # ~8 x (60 + 40) tokens: far past the 256-token context
        reply = "".join(convo.reply(f"Speak, good sir, of matter number {turn} and tell me more"))
        assert isinstance(reply, str)
        assert len(convo.prompt_ids()) <= rt.context_length - convo.reply_room
    assert convo.dropped > 0 and convo.history[-1]["role"] == "assistant"
    "".join(convo.reply("x" * 1000))  # one message longer than the whole context is cut, not fatal
    assert convo.truncated
    rt.close()


def test_chat_command_in_a_pseudo_terminal(model_gguf):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(str(NIMA_EDGE), ["chat", str(model_gguf), "--temperature", "0", "--max-new-tokens", "40",
                                           "--system", "Be brief."], encoding="utf-8", timeout=90)
    try:
        child.expect("you> ")
        child.sendline("Good morrow, my lord")
        child.expect("bot> (.+)\r\n")
        assert child.match.group(1).strip()
        child.expect("you> ")
        child.sendline("x" * 400)  # beyond the context
        child.expect(r"context full: \d+ oldest message")
        child.expect("you> ")
        child.sendline("/reset")
        child.expect("history cleared")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
