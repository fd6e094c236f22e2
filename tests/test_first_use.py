"""What a new user meets first: --help with the defaults, --prompt - , the chat REPL,
Hugging Face names from the local cache, and export in a smaller dtype."""

import argparse
import io
import json

import pytest
import torch

import fusegen
from fusegen.chat import ChatSession
from fusegen.cli import build_parser, main
from fusegen.errors import ModelNotFoundError
from fusegen.models import load_model, load_tokenizer, resolve_model


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_help_shows_every_default(name):
    parser = _subcommands()[name]
    help_text = " ".join(parser.format_help().split())
    shown = [a for a in parser._actions
             if a.help and not any(a.default is v for v in (None, False, argparse.SUPPRESS))]
    assert shown, name
    for action in shown:
        default = action.default
        assert f"default: {default})" in help_text or f"default {default})" in help_text, (name, action.dest)


def test_prompt_dash_reads_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("The capital of France is\n"))
    args = build_parser().parse_args(["generate", "--prompt", "-"])
    assert args.prompt == "The capital of France is"
    assert build_parser().parse_args(["generate", "--prompt", "- x"]).prompt == "- x"


def test_prompt_dash_with_empty_stdin_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["generate", "--prompt", "-"]) == 2
    assert "--prompt: stdin held no text" in capsys.readouterr().err


# --- chat -----------------------------------------------------------------------------------

def test_chat_repl_keeps_the_conversation(tiny_chat_dir, monkeypatch, capsys):
    tokenizer = load_tokenizer(tiny_chat_dir)
    compiled = fusegen.compile(load_model(tiny_chat_dir))
    session = ChatSession(compiled, tokenizer, system="Be brief.", max_new_tokens=6, temperature=0.0)
    first = "".join(session.reply("hello"))
    second = "".join(session.reply("how are you?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]

    # The second reply continues the whole conversation rendered by the chat template.
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
         {"role": "assistant", "content": first}, {"role": "user", "content": "how are you?"}],
        add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    want = compiled.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert second == tokenizer.decode(want, skip_special_tokens=True)
    alone = ChatSession(compiled, tokenizer, system="Be brief.", max_new_tokens=6, temperature=0.0)
    assert "".join(alone.reply("how are you?")) != second  # so the history did matter

    # The REPL: blank lines skipped, /exit ends, one reply per message.
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you?\n/exit\nnot read\n"))
    assert main(["chat", str(tiny_chat_dir), "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    assert capsys.readouterr().out == f"{first}\n{second}\n"

    # A conversation longer than the model drops its oldest exchanges; one message too long is an error.
    session.limit = len(session.prompt_ids(session.messages[2:] + [{"role": "user", "content": "x"}])) + 6
    "".join(session.reply("x"))
    assert [m["content"] for m in session.messages[::2]] == ["how are you?", "x"]
    with pytest.raises(ValueError, match=r"the message is \d+ tokens .* exceeds the model's"):
        "".join(session.reply("y" * session.limit))


def test_chat_without_a_template_is_one_line(tiny_chat_dir, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in tiny_chat_dir.iterdir():
        if f.name != "chat_template.jinja":
            (plain / f.name).write_bytes(f.read_bytes())
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["chat", str(plain)]) == 2
    assert "has no chat template" in capsys.readouterr().err


# --- Hugging Face names ---------------------------------------------------------------------

def _put_in_hf_cache(model_dir, cache, repo_id: str, revision: str = "0123456789abcdef") -> None:
    """Lay ``model_dir`` out as huggingface_hub's cache does: snapshots/<rev>/ and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_hf_name_resolves_from_the_local_cache(tiny_chat_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _put_in_hf_cache(tiny_chat_dir, tmp_path / "hub", "tiny-org/tiny-chat")
    path = resolve_model("tiny-org/tiny-chat")
    assert path == tmp_path / "hub" / "models--tiny-org--tiny-chat" / "snapshots" / "0123456789abcdef"
    assert load_tokenizer("tiny-org/tiny-chat").chat_template


def test_hf_name_not_in_the_cache_says_so_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("HuggingFaceTB/SmolLM2-360M")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and str(tmp_path / "hub") in message
    assert "fusegen never downloads" in message and "hf download HuggingFaceTB/SmolLM2-360M" in message
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())
    assert main(["inspect", "HuggingFaceTB/SmolLM2-360M"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


# --- export --dtype -------------------------------------------------------------------------

@pytest.mark.slow
def test_bundled_artifact_in_bf16_is_at_most_300_mib(tmp_path, capsys):
    out = tmp_path / "smollm2.fusegen"
    assert main(["export", "-o", str(out), "--dtype", "bf16"]) == 0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size <= 300 * 2**20, f"{size / 2**20:.1f} MiB"
    manifest = json.loads((out / "manifest.json").read_text())
    assert "bfloat16" in json.dumps(manifest)
    compiled = fusegen.load(out)
    assert compiled.facts["dtype"] == torch.bfloat16
    ids = compiled.tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = compiled.tokenizer.decode(compiled.generate(ids, max_new_tokens=4)[0, ids.shape[1]:])
    assert "Paris" in text
