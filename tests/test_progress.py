"""No silent steps: ``stage`` lines as a step starts, the compile bar naming each step as it
starts, and the CLI's generate and inspect showing both on stderr, with generate's tok/s."""

import logging
import re
import time

from fusegen import progress
from fusegen.cli import main


def test_stage_line_comes_before_the_step_ends(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fusegen")
    with progress.stage("capturing the graph"):
        assert caplog.messages == ["capturing the graph ..."]   # shown while the step runs
    assert caplog.messages == ["capturing the graph ..."]       # quick: no closing line
    monkeypatch.setattr(progress, "QUIET_BELOW_S", 0.01)
    with progress.stage("slow step"):
        time.sleep(0.02)
    assert re.fullmatch(r"slow step: done in \d+\.\d s", caplog.messages[-1]), caplog.messages


def test_bar_shows_a_step_name_as_the_step_starts(capsys):
    with progress.Bar(3, "compiling", True, unit="step") as bar:
        bar.update(0, "capture")
        assert "capture" in capsys.readouterr().err
        bar.update(1, "fuse_attention")
        assert "fuse_attention" in capsys.readouterr().err


def test_token_clock_summary():
    clock = progress.TokenClock()
    assert list(clock.ticks(iter([5, 6, 7]))) == [5, 6, 7]
    assert re.fullmatch(r"3 tokens in \d+\.\d\d s \(\d+\.\d tok/s; first after \d+\.\d\d s, then \d+\.\d tok/s\)",
                        clock.summary()), clock.summary()
    assert progress.TokenClock().summary() == "no tokens generated"


def test_generate_shows_every_step_and_its_tok_s(tiny_chat_dir, capsys):
    assert main(["generate", str(tiny_chat_dir), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    for step in ("loading the model from", "compiling LlamaForCausalLM", "capture", "fuse_attention", "checking",
                 "insert_paged_blocks", "fuse_pointwise", "kernels", "setting up the engine on cpu"):
        assert step in err, (step, err)
    assert re.search(r"fusegen-cli: 3 tokens in \d+\.\d\d s \(\d+\.\d tok/s", err), err
    assert "Loading weights" not in err   # transformers' own bar is off; the stage line says it


def test_inspect_shows_the_compile_steps(tiny_llama_dir, capsys):
    assert main(["inspect", str(tiny_llama_dir)]) == 0
    err = capsys.readouterr().err
    assert "compiling LlamaForCausalLM" in err and "capture" in err and "fuse_projections" in err, err


def test_the_entry_point_speaks_while_torch_loads():
    import os
    import subprocess
    import sys

    def start(after: str):
        env = dict(os.environ, FUSEGEN_STARTUP_NOTE_S=after)
        return subprocess.run([sys.executable, "-c", "import sys, fusegen_cli; sys.argv = ['fusegen-cli', "
                               "'--version']; sys.exit(fusegen_cli.main())"],
                              capture_output=True, text=True, env=env, timeout=120)

    slow = start("0")
    assert slow.returncode == 0 and slow.stdout.strip().startswith("fusegen ")
    assert slow.stderr.splitlines()[0] == "fusegen-cli: loading torch, transformers and fusegen ..."
    assert slow.stderr.splitlines()[1].startswith("fusegen-cli: loaded in ")
    assert start("600").stderr == ""   # quiet when loading is quick enough
