"""Every script in examples/ runs, on the mini chat model (the bundled one is for `slow`).

The scripts run in this process (``runpy``, as ``__main__``), which shares the imports;
the server example runs as its own process, as a user runs it, once ``fusegen.serve.app``
exists.
"""

import re
import runpy
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from safetensors import safe_open

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *argv: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_every_example_has_a_test():
    tested = {"plain_decoder.py", "compile_and_generate.py", "stream.py", "export_and_run.py",
              "server_openai.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_plain_decoder(monkeypatch, capsys):
    run_example("plain_decoder.py", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "fuse_attention" in out
    assert float(out.rsplit(":", 1)[1]) < 1e-4  # the compiled logits match the model's


def test_compile_and_generate(tiny_chat_dir, monkeypatch, capsys):
    run_example("compile_and_generate.py", str(tiny_chat_dir), "--prompt", "The sky", "--max-new-tokens", "4",
                monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "insert_paged_blocks" in out  # the pass table
    assert "\nThe sky" in out  # the prompt and its continuation, after the table


def test_stream(tiny_chat_dir, monkeypatch, capsys):
    run_example("stream.py", str(tiny_chat_dir), "--prompt", "Once", "--max-new-tokens", "5",
                monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert out.startswith("Once") and "\n[5 tokens in " in out
    assert [line[1:8] for line in out.split("\n")[-4:-1]] == ["The sky", "My favo", "In 1969"]  # repr()s


def test_export_and_run_in_bf16(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    artifact = tmp_path / "tiny.fusegen"
    run_example("export_and_run.py", str(tiny_chat_dir), "-o", str(artifact), "--dtype", "bf16",
                "--prompt", "Hi", "--max-new-tokens", "3", monkeypatch=monkeypatch)
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert first.startswith(f"exported {artifact}: ") and first.endswith(" MiB in bf16")
    assert rest.startswith("Hi")
    with safe_open(str(artifact / "weights" / "00000.safetensors"), "pt") as f:
        matrices = [f.get_slice(k) for k in f.keys() if len(f.get_slice(k).get_shape()) == 2]
    assert matrices and {m.get_dtype() for m in matrices} == {"BF16"}  # HF keeps inv_freq in fp32


@pytest.mark.skipif(find_spec("fusegen.serve.app") is None,
                    reason="fusegen.serve.app does not exist yet: `fusegen-cli serve` is not built")
def test_server_openai(tiny_chat_dir):
    done = subprocess.run([sys.executable, str(EXAMPLES / "server_openai.py"), str(tiny_chat_dir),
                           "--max-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    assert lines[0] == f"model: {tiny_chat_dir.name}"
    assert re.fullmatch(r"completion: .* \([0-4] tokens\)", lines[1]), lines[1]
    assert lines[2].startswith("chat: '") and lines[3].startswith("chat, streamed: ")
