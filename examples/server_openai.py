"""Talk to `fusegen-cli serve` with the official ``openai`` client.

    python examples/server_openai.py [MODEL]            # starts the server, then stops it
    python examples/server_openai.py --url http://127.0.0.1:8000 [MODEL]   # a running server

Without ``--url`` it starts ``fusegen-cli serve MODEL --host 127.0.0.1 --port PORT`` on a
free port, waits for ``GET /health``, and stops the server at the end. The server serves the
model under the name it was given (``smollm2`` by default; ``GET /v1/models`` lists it); the
requests below are plain OpenAI API calls: a completion, a chat completion, and a chat
completion streamed as server-sent events.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request

from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_server(model: str, timeout: float = 300.0):
    """``fusegen-cli serve MODEL`` on a free loopback port; yields its base URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fusegen", "serve", model,
                               "--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout  # the server compiles the model before it listens
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not answer {url}/health within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def talk(client: OpenAI, max_tokens: int) -> None:
    model = client.models.list().data[0].id  # the name the server serves the model under
    print(f"model: {model}")
    completion = client.completions.create(model=model, prompt="The capital of France is",
                                           max_tokens=max_tokens, temperature=0)
    print("completion:", repr(completion.choices[0].text), f"({completion.usage.completion_tokens} tokens)")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    print("chat:", repr(chat.choices[0].message.content))

    print("chat, streamed: ", end="", flush=True)
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0.7, seed=1, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2", help="the MODEL the server serves")
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(started_server(args.model))
        talk(OpenAI(base_url=f"{url}/v1", api_key=args.api_key), args.max_tokens)


if __name__ == "__main__":
    main()
