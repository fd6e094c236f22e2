"""fusegen-cli: run in-process through ``main(argv)``, and once as a real process."""

import json
import subprocess
import sys

import pytest

import fusegen
from fusegen.cli import main
from fusegen.config import CompileConfig
from fusegen.errors import ModelNotFoundError


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fusegen-cli: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fusegen {fusegen.__version__}\n"


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fusegen-cli")
    assert "inspect" in out


def test_inspect_help_lists_its_options(capsys):
    assert main(["inspect", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--dump-dir" in out and "--config" in out and "smollm2" in out


def test_missing_model_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["inspect", str(missing)]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert str(missing) in line and "no such directory" in line
    assert captured.out == ""


def test_bad_config_fails_before_loading_the_model(tmp_path, capsys):
    # The model path does not exist either: the config error must come first.
    assert main(["inspect", str(tmp_path / "missing"), "--config", "fuse_atention=1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown config field 'fuse_atention'" in line


def test_unsupported_model_names_its_class(tiny_t5_dir, capsys):
    assert main(["inspect", str(tiny_t5_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "T5ForConditionalGeneration is not supported" in line and "encoder-decoder" in line


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ModelNotFoundError):
        main(["--debug", "inspect", str(tmp_path / "missing")])


def test_inspect_writes_dumps_and_prints_the_table(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FUSEGEN_DUMP_DIR", raising=False)
    dumps = tmp_path / "dumps"
    config = "block_size=32"  # any non-default setting: checks it reaches fusegen.compile
    assert main(["inspect", str(tiny_llama_dir), "--dump-dir", str(dumps), "--config", config]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "LlamaForCausalLM" in out[0] and str(CompileConfig.from_string(config)) in out[0]
    assert out[-1] == f"dumps written to {dumps}"

    assert (dumps / "00_capture.py").is_file()
    after_capture = sorted(dumps.glob("01_*.py"))
    assert after_capture, sorted(p.name for p in dumps.iterdir())
    for dump in sorted(dumps.glob("[0-9][0-9]_*.py")):  # one table row per dumped pass
        assert any(dump.stem[3:] in line for line in out[1:-1]), (dump.name, out)


def test_python_dash_m_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "missing"
    proc = subprocess.run([sys.executable, "-m", "fusegen", "inspect", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(missing) in _one_error_line(proc.stderr)
    assert proc.stdout == ""


@pytest.mark.slow
def test_generate_streams_the_bundled_model_answer(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "Paris" in out


@pytest.mark.slow
def test_generate_is_reproducible_with_a_seed(capsys):
    runs = []
    for _ in range(2):
        assert main(["generate", "--prompt", "Once upon a time", "--max-new-tokens", "8", "--do-sample",
                     "--seed", "7", "--top-p", "0.9"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and len(runs[0]) > len("Once upon a time")


def test_generate_rejects_a_non_positive_token_count(capsys):
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fusegen-cli: error: --max-new-tokens must be >= 1, got 0"]


@pytest.mark.parametrize("argv, problem", [
    (["--do-sample", "--temperature", "0"], "--temperature must be > 0 with --do-sample, got 0.0"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--top-p", "1.5"], r"--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-1"], "--top-k must be >= 0, got -1"),
])
def test_bad_sampling_options_fail_before_loading_anything(argv, problem, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded a model before checking the options")

    monkeypatch.setattr("fusegen.cli.load_model", never)
    monkeypatch.setattr("fusegen.cli.load_tokenizer", never)
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"fusegen-cli: error: {problem}"


@pytest.mark.parametrize("device, problem", [("tpu", "--device 'tpu' is not a device"),
                                             ("meta", "--device 'meta': fusegen runs on cpu or cuda")])
def test_run_on_a_device_that_is_not_there_is_one_line(device, problem, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fusegen.load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["run", str(tmp_path), "--prompt", "hi", "--device", device]) == 2
    assert problem in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_export_then_run_answers_like_generate(tmp_path, capsys):
    prompt = ["--prompt", "The capital of France is", "--max-new-tokens", "8"]
    assert main(["generate", *prompt]) == 0
    generated = capsys.readouterr().out
    assert main(["export", "-o", str(tmp_path / "artifact"), "--onnx"]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in ("manifest.json", "graph.json", "weights/00000.safetensors", "tokenizer/tokenizer.json",
                 "model.onnx"):
        assert (tmp_path / "artifact" / name).is_file(), name
    assert main(["run", str(tmp_path / "artifact"), *prompt]) == 0
    assert capsys.readouterr().out == generated
    # Exporting over a directory that holds something else is refused, and it is left alone.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", "-o", str(tmp_path / "mine")]) == 2
    assert "not empty" in _one_error_line(capsys.readouterr().err)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_run_of_a_damaged_artifact_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "no such artifact directory" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{\"format\": \"fusegen-artifact\", \"format_ver")
    assert main(["run", str(tmp_path / "bad"), "--prompt", "hi"]) == 2
    assert "manifest.json: not valid JSON" in _one_error_line(capsys.readouterr().err)


def test_inspect_writes_the_html_report_with_the_analysis(tiny_llama_dir, tmp_path, capsys):
    html = tmp_path / "report.html"
    assert main(["inspect", str(tiny_llama_dir), "--html", str(html), "--batch", "2", "--seq", "64"]) == 0
    assert f"report written to {html}" in capsys.readouterr().out
    page = html.read_text()
    for section in ("summary", "passes", "ops", "graphs", "kernels", "analysis"):
        assert f'<section id="{section}"' in page, section
    assert "prefill" in page and "decode" in page and "attention" in page


def test_analyze_prints_both_phases_and_writes_plot_and_json(tiny_llama_dir, tmp_path, capsys):
    plot, data = tmp_path / "roofline.png", tmp_path / "analysis.json"
    assert main(["analyze", str(tiny_llama_dir), "--batch", "8", "--seq", "1024", "--gpu", "h100",
                 "--plot", str(plot), "--json", str(data)]) == 0
    out = capsys.readouterr().out
    assert "prefill: 8 sequences x 1024 tokens" in out and "decode: 8 sequences" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads(data.read_text())["phases"]) == {"prefill", "decode"}


@pytest.mark.parametrize("argv,problem", [
    (["--gpu", "v100"], "unknown GPU 'v100'"),
    (["--batch", "0"], "--batch and --seq must be >= 1"),
    (["--dtype", "int3"], "int3"),
])
def test_analyze_bad_arguments_fail_before_compiling(argv, problem, capsys):
    assert main(["analyze", "/nonexistent/model", *argv]) == 2
    assert problem in _one_error_line(capsys.readouterr().err)


def test_export_without_a_tokenizer_works_and_run_says_it_has_none(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["export", str(tiny_llama_dir), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "has no tokenizer files" in captured.err and "wrote" in captured.out
    assert fusegen.load(out).generate_batch([[5, 6, 7]], 3)     # token ids work
    assert main(["run", str(out), "--prompt", "hi"]) == 2
    assert "was exported without a tokenizer" in _one_error_line(capsys.readouterr().err)


def _counters(out: str, pass_name: str) -> dict:
    """The counters of ``pass_name``'s row in the table ``inspect`` prints."""
    row = next(line for line in out.splitlines() if f" {pass_name} " in line)
    return dict(item.split("=") for item in row.split("  ")[-1].strip().split(", "))


def test_int4_from_the_cli_is_calibrated_with_awq(tiny_chat_dir, capsys):
    assert main(["inspect", str(tiny_chat_dir), "--config", "weights=int4"]) == 0
    captured = capsys.readouterr()
    assert "calibrating int4 AWQ scales on fusegen/data/calibration.txt" in captured.err
    counters = _counters(captured.out, "quantize_weights")
    assert int(counters["awq_linears"]) == int(counters["linears_quantized"]) > 0, counters
    assert float(counters["awq_output_error"]) <= float(counters["plain_output_error"]), counters


def test_gqa_from_the_cli_calibrates_on_the_given_text(tiny_chat_dir, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["inspect", str(tiny_chat_dir), "--config", "gqa_kv_heads=1", "--calibration", str(text)]) == 0
    captured = capsys.readouterr()
    assert f"calibrating gqa_kv_heads=1 on {text}" in captured.err
    assert _counters(captured.out, "convert_mha_to_gqa")["kv_heads_after"] == "1"


@pytest.mark.parametrize("content, problem", [(None, "no such file"), ("", "the file is empty"),
                                              (" \n", "the file is empty")])
def test_a_missing_or_empty_calibration_file_is_one_line(content, problem, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    if content is not None:
        text.write_text(content)
    # The model path does not exist either: the file is checked first.
    assert main(["inspect", str(tmp_path / "missing"), "--config", "weights=int4", "--calibration", str(text)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"fusegen-cli: error: --calibration {text}: {problem}"


def test_int4_of_a_model_without_a_tokenizer_says_how_to_go_on(tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setattr("fusegen.cli.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["inspect", str(tiny_llama_dir), "--config", "weights=int4"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "int4 AWQ scales needs calibration tokens" in line and "int4_awq=0 compiles plain int4" in line
