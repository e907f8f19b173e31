"""`rlhf chat`: one-shot and interactive use of the installed console script, history, bad input."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.orchestrator.models.chat import ChatSession, run_chat
from rlhf.orchestrator.cli import main
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.models.tiny import IM_START, build_tiny_from_corpus, sample_corpus

RLHF = str(Path(sys.executable).with_name("rlhf"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("chat") / "tiny"))


def _rlhf(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_once_prints_a_reply_and_exits_0(model_dir):
    done = _rlhf("chat", model_dir, "--once", "hi", "--max-new-tokens", "8", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "no reply printed"
    assert len(done.stdout.splitlines()) >= 1


def test_bad_path_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "missing"
    done = _rlhf("chat", str(missing), "--once", "hi")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and str(missing) in done.stderr


def test_folder_that_is_not_a_model_is_bad_input(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--once", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "not a model folder" in err


def test_tokenizer_without_chat_template_is_bad_input(model_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    with pytest.raises(BadInput, match="no chat template"):
        ChatSession.load(folder)


def test_session_keeps_history_and_resets(model_dir):
    chat = ChatSession.load(model_dir, system="Be brief.", max_new_tokens=6, temperature=0)
    first = chat.send("What is 2 + 3?")
    chat.send("Now add 1 to that.")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first
    chat.messages.pop()  # look at the prompt the second reply was generated from
    rendered = chat.render()
    assert "What is 2 + 3?" in rendered and f"{IM_START}assistant\n{first}" in rendered
    assert rendered.endswith(f"{IM_START}assistant\n")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


def test_interactive_loop_two_turns_then_exit(model_dir):
    out = io.StringIO()
    run_chat(model_dir, max_new_tokens=4, temperature=0, stdin=io.StringIO("hello\nagain\n/exit\nnever\n"), stdout=out)
    assert len(out.getvalue().splitlines()) == 2  # one reply per message, stops at /exit


def test_interactive_console_script_reads_stdin_until_eof(model_dir):
    done = _rlhf("chat", model_dir, "--max-new-tokens", "4", stdin="hello\n/reset\nagain\n")
    assert done.returncode == 0, done.stderr
    assert "(conversation reset)" in done.stdout
