"""``fusegen-cli``: the command line.

    fusegen-cli inspect  [MODEL] [--dump-dir DIR] [--html FILE] [--config STR]
    fusegen-cli generate [MODEL] --prompt TEXT [--tp N] [...]
    fusegen-cli export   [MODEL] -o DIR [--dtype bf16|fp16|fp32] [--onnx] [--config STR] [--tp N]
    fusegen-cli run      DIR --prompt TEXT [--tp N] [...]
    fusegen-cli serve    [MODEL|DIR] [--port P] [--tp N] [...]
    fusegen-cli chat     [MODEL] [--system TEXT] [...]
    fusegen-cli analyze  [MODEL] --batch B --seq T --gpu h100 [--plot PNG] [--json FILE]
    fusegen-cli quality  [MODEL] [--config STR] [--length N] [--json FILE]

A command that compiles with a config whose passes fit on real text (``weights=int4`` with
AWQ, ``gqa_kv_heads=N``) passes them calibration tokens: fusegen/data/calibration.txt, or
``--calibration FILE``, tokenized with the model's tokenizer (``fusegen.calibration``).

Each subcommand is one function registered with ``@command(name, help, *arguments)``; its
arguments are declared next to it with ``arg(...)`` (the same parameters as argparse's
``add_argument``); ``--help`` shows each default. A user error (``FusegenError``, a missing file, a bad value) ends the
command with one line on stderr, ``fusegen-cli: error: <message>``, and exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Callable

import torch

import fusegen
from fusegen import __version__, tp_launch
from fusegen.calibration import compile_calibrated, prepare
from fusegen.config import CompileConfig
from fusegen.errors import FusegenError
from fusegen.models import DEFAULT_MODEL, load_model, load_tokenizer
from fusegen.progress import TokenClock, stage

PROG = "fusegen-cli"
EXIT_USER_ERROR = 2

_COMMANDS: list[tuple[str, str, tuple, Callable[[argparse.Namespace], int]]] = []


def arg(*flags, **options) -> tuple:
    """One argument of a subcommand, as argparse's ``add_argument(*flags, **options)``."""
    return flags, options


def command(name: str, help: str, *arguments: tuple):
    """Register ``fn(args) -> int`` as the subcommand ``name``."""
    def register(fn: Callable[[argparse.Namespace], int]):
        _COMMANDS.append((name, help, arguments, fn))
        return fn
    return register


# Arguments shared by the subcommands that take a model.
MODEL_ARG = arg("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                help="a local Hugging Face model directory (config.json + *.safetensors), a "
                     "bundled model name, or a Hugging Face name in the local HF cache")
CONFIG_ARG = arg("--config", metavar="STR", default=None,
                 help="compile configuration, e.g. 'preset=stateless' or "
                      "'fuse_attention=1,block_size=32' (default: the default preset)")
CALIBRATION_ARG = arg("--calibration", metavar="FILE", default=None,
                      help="text the lossy passes that need it fit on (int4 AWQ scales, gqa_kv_heads), "
                           "tokenized with the model's tokenizer (default: fusegen/data/calibration.txt)")

TP_ARG = arg("--tp", type=int, default=1, metavar="N",
             help="tensor parallelism over N ranks, one process each (one per GPU; gloo on the CPU), which "
                  "this command spawns; under torchrun, N must be its --nproc-per-node (default: 1)")


def _parse_config(text: str | None, tp: int = 1) -> CompileConfig | None:
    config = None if text is None else CompileConfig.from_string(text)
    if tp != 1:
        config = (config or CompileConfig()).replace(tp=tp)
    return config


def _follower(compiled) -> bool:
    """A rank > 0 of a tensor-parallel model: it runs rank 0's steps (True once they end)."""
    if compiled.tp_group is None or compiled.tp_group.is_driver:
        return False
    compiled.follow()
    return True


# --- subcommands ----------------------------------------------------------------------------

ANALYSIS_ARGS = (
    arg("--batch", type=int, default=8, metavar="B", help="sequences in the batch (default 8)"),
    arg("--seq", type=int, default=1024, metavar="T",
        help="prompt length in prefill, cache length in decode (default 1024)"),
    arg("--gpu", default="h100", help="h100, h200 or a100: the peak FLOP/s and bandwidth (default h100)"),
    arg("--dtype", default="bf16", help="element type the bytes are counted in (default bf16)"),
)


@command("inspect", "compile a model and print what every pass did",
         MODEL_ARG,
         arg("--dump-dir", metavar="DIR", default=None,
             help="write the graph after every pass (NN_<pass>.py) and summary.txt/json here"),
         arg("--html", metavar="FILE", default=None,
             help="write a self-contained HTML report: the graph after every pass, counters, "
                  "kernel sources and the roofline analysis (at --batch/--seq/--gpu/--dtype)"),
         *ANALYSIS_ARGS,
         CONFIG_ARG, CALIBRATION_ARG)
def inspect_command(args: argparse.Namespace) -> int:
    config = _parse_config(args.config)  # before loading, so a typo fails fast
    if args.html:
        _check_analysis_args(args)
    calibration = prepare(args.model, config, args.calibration)
    model = load_model(args.model)
    compiled = compile_calibrated(model, config, calibration, dump_dir=args.dump_dir, progress=True)
    print(compiled.report.table())
    if compiled.report.dump_dir:
        print(f"dumps written to {compiled.report.dump_dir}")
    if args.html:
        from fusegen import analysis
        from fusegen.report import write_html_report

        with stage(f"writing the HTML report {args.html}"):
            result = analysis.analyze(compiled, args.batch, args.seq, args.gpu, analysis.parse_dtype(args.dtype))
            path = write_html_report(compiled, args.html, result.summary_rows(),
                                     title=f"fusegen report: {args.model}")
        print(f"report written to {path}")
    return 0


@command("analyze", "roofline cost model of the optimized graph: FLOPs, bytes and arithmetic "
                    "intensity per node and phase (prefill, decode), against a GPU's ridge point",
         MODEL_ARG,
         *ANALYSIS_ARGS,
         arg("--plot", metavar="PNG", default=None, help="save the roofline plot here (needs matplotlib)"),
         arg("--json", metavar="FILE", default=None, help="save every node's costs as JSON"),
         CONFIG_ARG, CALIBRATION_ARG)
def analyze_command(args: argparse.Namespace) -> int:
    from fusegen.analysis import run_cli

    _check_analysis_args(args)
    return run_cli(args.model, args.batch, args.seq, args.gpu, args.dtype, args.plot, args.json, args.config,
                   args.calibration)


@command("quality", "what a lossy config costs: held-out perplexity, KV-cache bytes per token and "
                    "weight bytes of the model against the model compiled with --config "
                    "(e.g. 'gqa_kv_heads=1,gqa_method=refit' or 'weights=int8')",
         MODEL_ARG,
         arg("--length", type=int, default=256, metavar="N",
             help="tokens per held-out and calibration sequence (at most the model's positions)"),
         arg("--json", metavar="FILE", default=None, help="also save the table and the passes' counters as JSON"),
         CONFIG_ARG, CALIBRATION_ARG)
def quality_command(args: argparse.Namespace) -> int:
    from fusegen.calibration import read_text
    from fusegen.quality import measure

    config = _parse_config(args.config) or CompileConfig()  # before loading, so a typo fails fast
    if args.length < 2:
        raise ValueError(f"--length must be >= 2, got {args.length}")
    text = None if args.calibration is None else read_text(args.calibration)
    result = measure(args.model, [config], args.length, calibration=text)
    print(result.table())
    if args.json:
        result.save(args.json)
        print(f"written to {args.json}")
    return 0


def _check_analysis_args(args: argparse.Namespace) -> None:
    from fusegen import analysis

    if args.batch < 1 or args.seq < 1:
        raise ValueError(f"--batch and --seq must be >= 1, got {args.batch} and {args.seq}")
    analysis.gpu_spec(args.gpu), analysis.parse_dtype(args.dtype)  # bad names fail before compiling


def _prompt_text(text: str) -> str:
    """``--prompt``'s value; ``-`` reads the prompt from stdin (one trailing newline dropped)."""
    if text != "-":
        return text
    read = sys.stdin.read()
    if not read.strip():
        raise argparse.ArgumentTypeError("stdin held no text")
    return read.removesuffix("\n")


def _prompt_read_here(argv: list[str], prompt: str | None) -> list[str]:
    """``argv`` for the spawned ranks: a ``--prompt -`` already read from this process's stdin
    (the ranks' stdin is not the terminal's) passed on as ``--prompt=TEXT``."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--prompt" and i + 1 < len(argv) and argv[i + 1] == "-":
            out.append(f"--prompt={prompt}")
            i += 2
            continue
        out.append(f"--prompt={prompt}" if argv[i] == "--prompt=-" else argv[i])
        i += 1
    return out


SAMPLING_ARGS = (
    arg("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most"),
    arg("--do-sample", action="store_true", help="sample instead of greedy decoding"),
    arg("--temperature", type=float, default=0.7, help="sampling temperature, with --do-sample"),
    arg("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)"),
    arg("--top-p", type=float, default=1.0, help="nucleus sampling mass"),
    arg("--seed", type=int, default=None, help="makes sampling reproducible"),
)
GENERATION_ARGS = (
    arg("--prompt", required=True, type=_prompt_text, help="the text to continue; - reads it from stdin"),
    arg("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"),
    *SAMPLING_ARGS,
)


@command("generate", "generate text from a prompt, streaming tokens as they are produced",
         MODEL_ARG, *GENERATION_ARGS, CONFIG_ARG, CALIBRATION_ARG, TP_ARG)
def generate_command(args: argparse.Namespace) -> int:
    config = _parse_config(args.config, args.tp)
    _check_generation_args(args)
    tokenizer = load_tokenizer(args.model)
    calibration = prepare(args.model, config, args.calibration, tokenizer)
    model = load_model(args.model)
    compiled = compile_calibrated(model, config, calibration, progress=True)
    if _follower(compiled):
        return 0
    try:
        return _stream_completion(compiled, tokenizer, args)
    finally:
        if compiled.tp_group is not None:
            compiled.stop_followers()


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@command("export", "compile a model and write it as an artifact directory that `run` and "
                   "fusegen.load() use without the model's code",
         MODEL_ARG,
         arg("-o", "--output", required=True, metavar="DIR", help="the artifact directory to write"),
         arg("--dtype", choices=sorted(EXPORT_DTYPES), default="fp32",
             help="the weights' and the compiled graph's element type"),
         arg("--onnx", action="store_true",
             help="also write the optimized graph as DIR/model.onnx (fused ops in the 'fusegen' domain)"),
         arg("--sign", metavar="KEY", default=None,
             help="sign the manifest with this Ed25519 private key (PEM); `run --trusted-key` checks it"),
         CONFIG_ARG, CALIBRATION_ARG, TP_ARG)
def export_command(args: argparse.Namespace) -> int:
    from fusegen.artifact import check_destination, export

    from fusegen.artifact.sign import read_key

    config = _parse_config(args.config, args.tp)
    check_destination(args.output)  # before the slow part
    sign_key = read_key(args.sign, private=True) if args.sign else None
    tokenizer = _optional_tokenizer(args.model)
    calibration = prepare(args.model, config, args.calibration, tokenizer)
    model = load_model(args.model, dtype=EXPORT_DTYPES[args.dtype])
    compiled = compile_calibrated(model, config, calibration, progress=True)
    directory = export(compiled, args.output, tokenizer=tokenizer, onnx=args.onnx, sign_key=sign_key,
                       progress=True)
    if compiled.tp_group is not None and not compiled.tp_group.is_driver:
        return 0
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    print(f"wrote {directory} ({total / 2**20:.1f} MiB): {compiled.report.model_class}, "
          f"{len(compiled.facts['kernels'])} kernels, config {compiled.config}")
    return 0


@command("run", "load an artifact written by `export` and generate text from a prompt",
         arg("artifact", metavar="DIR", help="an artifact directory written by `fusegen-cli export`"),
         *GENERATION_ARGS,
         arg("--device", default=None, help="where to run (default: the device it was compiled for)"),
         arg("--trusted-key", metavar="PUB", action="append", default=None,
             help="an Ed25519 public key (PEM) the artifact must be signed with (repeatable)"),
         arg("--tp", type=int, default=1, metavar="N",
             help="the ranks of an artifact exported with --tp N, one process each, which this command "
                  "spawns (default: 1)"))
def run_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fusegen.artifact import read_manifest

    _check_generation_args(args)
    _check_device(args.device)
    if Path(args.artifact).is_dir() and read_manifest(_first_rank(Path(args.artifact))).get("tokenizer") is None:
        raise ValueError(f"{args.artifact} was exported without a tokenizer; use fusegen.load() "
                         f"with token ids instead")
    compiled = fusegen.load(args.artifact, device=args.device, trusted_keys=args.trusted_key, progress=True)
    if compiled.tokenizer is None:
        raise ValueError(f"{args.artifact} was exported without a tokenizer; use fusegen.load() "
                         f"with token ids instead")
    if _follower(compiled):
        return 0
    try:
        return _stream_completion(compiled, compiled.tokenizer, args)
    finally:
        if compiled.tp_group is not None:
            compiled.stop_followers()


def _first_rank(directory):
    """An artifact's directory, or rank 0's of a tensor-parallel one (exported with --tp)."""
    import json

    from fusegen.artifact import MANIFEST
    from fusegen.artifact.tensor_parallel import is_sharded, rank_dir

    try:
        sharded = is_sharded(json.loads((directory / MANIFEST).read_bytes()))
    except (OSError, ValueError):
        return directory   # read_manifest names the problem
    return directory / rank_dir(0) if sharded else directory


@command("serve", "serve the model over an OpenAI-compatible HTTP API (/v1/completions, "
                  "/v1/chat/completions, /v1/models, /health, /metrics)",
         arg("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL|ARTIFACT",
             help=f"an artifact directory written by `export`, a local Hugging Face model directory, or "
                  f"a bundled model name (default: {DEFAULT_MODEL})"),
         arg("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"),
         arg("--port", type=int, default=8000, help="port to listen on (default: %(default)s)"),
         arg("--api-key", metavar="KEY", default=None,
             help="require 'Authorization: Bearer KEY' on /v1/ requests (default: none)"),
         arg("--served-model-name", metavar="NAME", default=None,
             help="the model name clients send (default: the MODEL argument's last path part)"),
         arg("--max-queue", type=int, default=1024, metavar="N",
             help="requests allowed to wait for a batch slot before the server answers 503 "
                  "(default: %(default)s)"),
         CONFIG_ARG, CALIBRATION_ARG, TP_ARG)
def serve_command(args: argparse.Namespace) -> int:
    from fusegen.serve.main import serve

    _check_serve_args(args)
    return serve(args.model, args.host, args.port, args.api_key, _parse_config(args.config, args.tp),
                 args.served_model_name, args.max_queue, args.calibration)


def _check_serve_args(args: argparse.Namespace) -> None:
    from fusegen.serve.main import check_bind

    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    if tp_launch.rank() == 0:
        check_bind(args.host, args.port, args.api_key)


# what a command checks once before its ranks are spawned (each rank checks again)
_BEFORE_SPAWN = {"serve": _check_serve_args}


@command("chat", "a multi-turn conversation in the terminal through the tokenizer's chat template: "
                 "one message per line, /reset forgets, /exit or end of input ends",
         MODEL_ARG,
         arg("--system", metavar="TEXT", default=None, help="a system message opening the conversation"),
         *SAMPLING_ARGS,
         CONFIG_ARG, CALIBRATION_ARG)
def chat_command(args: argparse.Namespace) -> int:
    from fusegen.chat import ChatSession, run_repl

    config = _parse_config(args.config)
    _check_generation_args(args)
    tokenizer = load_tokenizer(args.model)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{args.model}: its tokenizer has no chat template; use `generate --prompt`")
    calibration = prepare(args.model, config, args.calibration, tokenizer)
    compiled = compile_calibrated(load_model(args.model), config, calibration)
    session = ChatSession(compiled, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature if args.do_sample else 0.0, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)
    return run_repl(session)


def _optional_tokenizer(model: str):
    """The model's tokenizer, or None (with a note) when its directory has none: an artifact
    then works with token ids through the Python API."""
    from fusegen.errors import ModelNotFoundError

    try:
        return load_tokenizer(model)
    except ModelNotFoundError as exc:
        if "no tokenizer files" not in str(exc):
            raise
        print(f"{PROG}: note: {model} has no tokenizer files; the artifact will have none "
              f"(use token ids with fusegen.load)", file=sys.stderr)
        return None


def _check_generation_args(args: argparse.Namespace) -> None:
    """Every generation option, before anything slow (loading, compiling) runs."""
    from fusegen.runtime.sampling import SamplingParams

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.do_sample and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 with --do-sample, got {args.temperature}")
    try:
        SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise ValueError(f"--{str(exc).replace('_', '-')}") from None


def _check_device(text: str | None) -> None:
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device; fusegen runs on cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: fusegen runs on cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r}: no CUDA GPU is available here")


def _stream_completion(compiled, tokenizer, args: argparse.Namespace) -> int:
    """Print the prompt's continuation as it is generated."""
    if compiled.kind != "paged":
        raise ValueError(f"this graph is {compiled.kind}; text generation needs the paged graph "
                         f"(the default config)")
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(args.prompt).input_ids
    block = compiled.facts["kv"].block_size
    engine = compiled.engine(num_blocks=-(-(len(ids) + args.max_new_tokens) // block), max_num_seqs=1,
                             max_num_batched_tokens=max(len(ids), 1))
    if not args.chat:   # after the engine's set-up, whose progress lines go to stderr
        print(args.prompt, end="", flush=True)
    tokens: list[int] = []
    shown = ""
    clock = TokenClock()
    stream = engine.stream(ids, args.max_new_tokens, temperature=args.temperature if args.do_sample else 0.0,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for token in clock.ticks(stream):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)  # decode the whole tail: multi-token characters
        shown = text
    print()
    print(f"{PROG}: {clock.summary()}", file=sys.stderr)
    return 0


# --- entry point ----------------------------------------------------------------------------

class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to every option with a default its help does not already give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="fusegen: an ahead-of-time graph compiler for decoder-only language models.")
    parser.add_argument("--version", action="version", version=f"fusegen {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of a one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, arguments, fn in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        for flags, options in arguments:
            p.add_argument(*flags, **options)
        p.set_defaults(run=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fusegen-cli`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, and argparse's own usage errors
        return 0 if e.code is None else e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    try:
        if getattr(args, "tp", 1) < 1:
            raise ValueError(f"--tp must be >= 1, got {args.tp}")
        if getattr(args, "tp", 1) > 1 and not tp_launch.under_launcher():
            _parse_config(getattr(args, "config", None), args.tp)   # a bad config fails once, not per rank
            _BEFORE_SPAWN.get(args.command, lambda _: None)(args)
            spawned = sys.argv[1:] if argv is None else list(argv)
            return tp_launch.spawn(_prompt_read_here(spawned, getattr(args, "prompt", None)), args.tp)
        with _progress_messages_on_stderr():
            return args.run(args)
    except (FusegenError, FileNotFoundError, FileExistsError, ValueError) as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # always one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _progress_messages_on_stderr():
    """Let fusegen's INFO messages (e.g. the one-time model conversion) reach stderr while a
    command runs; transformers' own weight-loading bars are off meanwhile (fusegen's stage
    lines say what is being loaded)."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("fusegen")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    level = logger.level
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
