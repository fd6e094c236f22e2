"""``fusegen-cli serve``: load or compile the model, build its engine, and run the app under
uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import socket
import sys
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
    import uvicorn

    check_bind(host, port, api_key)
    served = load_served(model, config, name, calibration=calibration)
    app = build_app(served, api_key=api_key, max_waiting=max_waiting)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    print(f"fusegen-cli: serving {served.name} on http://{host}:{port}/v1 "
          f"({served.engine.kv.num_blocks} KV blocks of {served.engine.kv.block_size} tokens)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
