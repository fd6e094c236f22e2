"""``fusegen-cli serve``: load or compile the model, build its engine, and run the app under
uvicorn until interrupted (SIGINT or SIGTERM: a graceful shutdown). With ``--tp N`` each
rank runs this; rank 0 serves, the others follow its engine until it stops them."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import sys
import threading
from pathlib import Path

from fusegen.serve.app import ServedModel, build_app

# The engine thread and the event loop share the GIL. When the engine thread wakes (its step's
# tokens are ready) it waits for the running thread to give the GIL up, up to the switch
# interval: Python's 5 ms default is longer than a decode step, so the server lowers it.
SWITCH_INTERVAL_S = 0.0005


def load_served(model: str, config=None, name: str | None = None, progress: bool = True,
                calibration: str | None = None) -> ServedModel:
    """An artifact directory (``fusegen-cli export``) or a model name/directory, compiled now
    (with calibration tokens from the text file ``calibration`` if the config needs them)."""
    compiled, tokenizer = load_compiled(model, config, progress, calibration)
    return served_model(compiled, tokenizer, model, name)


def load_compiled(model: str, config=None, progress: bool = True, calibration: str | None = None):
    """(compiled model, tokenizer) of ``load_served``, without the engine (which, with tensor
    parallelism, only rank 0 builds)."""
    import fusegen
    from fusegen.artifact import MANIFEST
    from fusegen.calibration import compile_calibrated, prepare
    from fusegen.models import load_model, load_tokenizer

    if (Path(model) / MANIFEST).is_file():
        if config is not None:
            raise ValueError("--config applies when compiling; an artifact keeps the config it was compiled with")
        if calibration is not None:
            raise ValueError("--calibration applies when compiling; an artifact was calibrated when exported")
        compiled = fusegen.load(model, progress=progress)
        tokenizer = compiled.tokenizer
        if tokenizer is None:
            raise ValueError(f"{model} was exported without a tokenizer; the server needs one")
    else:
        tokenizer = load_tokenizer(model)
        tokens = prepare(model, config, calibration, tokenizer)
        compiled = compile_calibrated(load_model(model), config, tokens, progress=progress)
    if compiled.kind != "paged":
        raise ValueError(f"this graph is {compiled.kind}; serving needs the paged graph (the default config)")
    return compiled, tokenizer


def served_model(compiled, tokenizer, model: str, name: str | None = None) -> ServedModel:
    return ServedModel(name or Path(model).name or model, compiled.engine(), tokenizer,
                       sampling_defaults(compiled.facts.get("generation") or {}))


def sampling_defaults(generation: dict) -> dict:
    """The model's ``generation_config`` sampling values, used where a request sets none (as
    HF applies them only when it samples, they count only with ``do_sample``)."""
    if not generation.get("do_sample"):
        return {}
    keys = ("temperature", "top_p", "top_k", "repetition_penalty")
    return {k: generation[k] for k in keys if generation.get(k) is not None}


def check_bind(host: str, port: int, api_key: str | None) -> None:
    """Refuse a port that is taken (one line, before the slow part) and warn about an open
    server without a key."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if api_key is None and not _is_loopback(host):
        print(f"fusegen-cli: warning: serving on {host} without --api-key: anyone who can reach this "
              f"address can use the model", file=sys.stderr)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: str, host: str, port: int, api_key: str | None, config=None, name: str | None = None,
          max_waiting: int = 1024, calibration: str | None = None) -> int:
    """Serve until interrupted (the caller has run ``check_bind``). With tensor parallelism
    (``config.tp`` > 1, one process per rank) rank 0 serves and runs the engine; the other
    ranks follow its steps until it stops them, after the server has shut down. A rank that
    is gone ends the server, and this raises its TensorParallelError."""
    compiled, tokenizer = load_compiled(model, config, calibration=calibration)
    group = compiled.tp_group
    if group is not None and not group.is_driver:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # rank 0 leads the shutdown: it stops this rank
        compiled.follow()
        return 0
    fatal = None
    try:
        fatal = _run_server(compiled, tokenizer, model, name, host, port, api_key, max_waiting)
    finally:
        if group is not None and fatal is None:
            compiled.stop_followers()
    if fatal is not None:
        raise fatal
    return 0


def _run_server(compiled, tokenizer, model, name, host, port, api_key, max_waiting):
    """Run uvicorn until it stops; the error that ended the engine loop, if one did."""
    import uvicorn

    served = served_model(compiled, tokenizer, model, name)

    def stop(exc):
        server.should_exit = True

    app = build_app(served, api_key=api_key, max_waiting=max_waiting, on_fatal=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    ranks = f", tp={compiled.tp_group.size}" if compiled.tp_group is not None else ""
    print(f"fusegen-cli: serving {served.name} on http://{host}:{port}/v1 "
          f"({served.engine.kv.num_blocks} KV blocks of {served.engine.kv.block_size} tokens{ranks})",
          file=sys.stderr)
    with _sigterm_ends_quietly():
        server.run()
    return app.state.loop.fatal


@contextlib.contextmanager
def _sigterm_ends_quietly():
    """uvicorn shuts down on SIGTERM, then raises it again, which kills the process by
    default: here that second one is ignored, so that rank 0 still stops the other ranks
    and the command exits 0 (a SIGINT still ends it as KeyboardInterrupt, after the same)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
