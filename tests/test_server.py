"""The OpenAI-compatible server, live on 127.0.0.1, driven by the real ``openai`` client.

The model is ``tiny_chat_dir`` (a random-weight 2-layer Llama with a byte-level tokenizer
and a chat template). Every text the server returns is checked against the compiled
model's own ``generate_batch`` on the same prompt: greedy, and seeded sampling.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import threading
import time

import pytest
import torch



def _need(module: str):
    """The serve extra and the openai client come with the test extra, and CI must have them;
    elsewhere (a GPU host set up with the core packages only, running `-m gpu`) this file is
    skipped instead of failing to collect."""
    return importlib.import_module(module) if os.environ.get("CI") else pytest.importorskip(module)


httpx, openai, uvicorn = _need("httpx"), _need("openai"), _need("uvicorn")
_need("fastapi")
text_string_to_metric_families = _need("prometheus_client.parser").text_string_to_metric_families

import fusegen
from fusegen.models import load_model, load_tokenizer
from fusegen.serve.app import ServedModel, build_app
from fusegen.serve.loop import EngineLoop, Overloaded, Spec

NAME = "tiny"
KEY = "sk-test-key"


class LiveServer:
    """uvicorn serving ``app`` in a thread on a free loopback port."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))   # held from here on: no other test can take the port
        port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


@pytest.fixture(scope="module")
def compiled(tiny_chat_dir):
    return fusegen.compile(load_model(tiny_chat_dir))


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_dir):
    return load_tokenizer(tiny_chat_dir)


def _serve(compiled, tokenizer, **options):
    engine = compiled.engine(max_num_seqs=8, max_num_batched_tokens=256)
    app = build_app(ServedModel(NAME, engine, tokenizer), **options)
    return LiveServer(app), engine


@pytest.fixture(scope="module")
def live(compiled, tokenizer):
    server, engine = _serve(compiled, tokenizer)
    yield server, engine
    server.close()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0)


def _reference(compiled, tokenizer, prompt_ids, n, **sampling):
    """(token ids, text) that generate_batch gives; eos is not part of the text."""
    tokens = compiled.generate_batch([prompt_ids], n, **sampling)[0]
    text_tokens = tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_token_id else tokens
    return tokens, tokenizer.decode(text_tokens, skip_special_tokens=True)


def _pool_full(engine, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.scheduler.requests and engine.kv.pool.num_free == engine.kv.num_blocks:
            return True
        time.sleep(0.02)
    return False


PROMPT = "Hello"


# --- completions and chat, token-identical to generate -------------------------------------------

def test_greedy_completion_is_token_identical_to_generate(client, compiled, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    tokens, text = _reference(compiled, tokenizer, ids, 12, temperature=0.0)
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert choice.model_extra["token_ids"] == tokens
    assert choice.text == text
    assert choice.finish_reason == ("stop" if tokens[-1] == tokenizer.eos_token_id else "length")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(tokens)
    assert out.usage.total_tokens == len(ids) + len(tokens)


def test_streamed_completion_concatenates_to_the_same_text(client, compiled, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    tokens, text = _reference(compiled, tokenizer, ids, 20, temperature=0.0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_seeded_chat_is_token_identical_to_generate(client, compiled, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ünïcode ☃"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    tokens, want = _reference(compiled, tokenizer, ids, 24, do_sample=True, temperature=0.9, top_p=0.95, top_k=40,
                              seed=7)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0.9,
                                         top_p=0.95, seed=7, extra_body={"top_k": 40, "return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == tokens
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
    streamed = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0.9,
                                                   top_p=0.95, seed=7, extra_body={"top_k": 40}, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_n_choices_use_consecutive_seeds(client, compiled, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=3, n=3,
                                    extra_body={"return_token_ids": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    for i, choice in enumerate(out.choices):
        assert choice.model_extra["token_ids"] == _reference(compiled, tokenizer, ids, 10, do_sample=True,
                                                             seed=3 + i)[0]
    assert len({tuple(c.model_extra["token_ids"]) for c in out.choices}) > 1


def test_token_id_prompts_and_prompt_lists(client, compiled, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    out = client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=5, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert [c.model_extra["token_ids"] for c in out.choices] == \
        [_reference(compiled, tokenizer, p, 5, temperature=0.0)[0] for p in (ids, ids[:3])]
    assert out.usage.prompt_tokens == len(ids) + 3


def test_stop_strings_cut_the_text_and_end_the_request(client, live, compiled, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    tokens, text = _reference(compiled, tokenizer, ids, 30, temperature=0.0)
    stop = text[5:8]
    assert len(text) > 8 and stop
    want = text[:text.find(stop)]
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "\x00"])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    assert _pool_full(live[1])


def test_logprobs_are_the_models_own(client, compiled, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0, logprobs=2,
                                    extra_body={"return_token_ids": True})
    lp = out.choices[0].logprobs
    first = out.choices[0].model_extra["token_ids"][0]
    want = torch.log_softmax(compiled(torch.tensor([ids]))[0, -1].double(), -1)
    assert lp.token_logprobs[0] == pytest.approx(want[first].item(), abs=1e-4)
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) <= 2
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-6)  # greedy: best
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 2 and len(content[0].top_logprobs) == 3
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


# --- the other endpoints -------------------------------------------------------------------------

def test_models_health_and_metrics(client, live):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(live[0].url + "/health").json() == {"status": "ok"}
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(live[0].url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("fusegen_requests", "fusegen_prompt_tokens", "fusegen_generation_tokens",
                 "fusegen_time_to_first_token_seconds", "fusegen_time_per_output_token_seconds",
                 "fusegen_kv_blocks_in_use", "fusegen_kv_blocks_total", "fusegen_requests_waiting"):
        assert name in families, name
    ok = [s for s in families["fusegen_requests"].samples
          if s.name == "fusegen_requests_total" and s.labels == {"endpoint": "/v1/completions", "status": "200"}]
    assert ok and ok[0].value >= 1
    ttft = [s for s in families["fusegen_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0].value >= 1
    assert families["fusegen_kv_blocks_total"].samples[0].value == live[1].kv.num_blocks


# --- many clients, and clients that leave --------------------------------------------------------

def test_100_concurrent_streaming_clients_all_complete(live, compiled, tokenizer):
    server, engine = live
    prompts = [f"request {i}: " + "abc"[: i % 3 + 1] for i in range(100)]

    async def one(client, prompt):
        text, finish = "", None
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True)
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=200),
                                                                    timeout=120)) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    assert all(finish in ("stop", "length") for _, finish in results)
    for prompt, (text, _) in list(zip(prompts, results))[:6]:
        assert text == _reference(compiled, tokenizer, tokenizer(prompt).input_ids, 8, temperature=0.0)[1]
    assert _pool_full(engine)


@pytest.fixture
def slow(compiled, tokenizer):
    """A server whose engine takes at least 5 ms a step, so that a 400-token request is still
    running when its client leaves, however fast the machine."""
    server, engine = _serve(compiled, tokenizer)
    step = engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    engine.step = slow_step
    yield server, engine
    server.close()


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(slow):
    server, engine = slow
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    aborted = engine.stats["aborted"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert engine.scheduler.requests   # still running when the client leaves
    assert _pool_full(engine) and engine.stats["aborted"] == aborted + 1   # aborted, not run to its end


def test_a_non_streaming_client_that_disconnects_frees_its_blocks(slow):
    server, engine = slow
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    aborted = engine.stats["aborted"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    assert _pool_full(engine) and engine.stats["aborted"] == aborted + 1


# --- bad requests --------------------------------------------------------------------------------

def _post(live, path, body, headers=None, raw=None):
    return httpx.post(live[0].url + path, content=raw if raw is not None else json.dumps(body),
                      headers={"content-type": "application/json", **(headers or {})}, timeout=30)


BAD = {
    "malformed JSON": (None, '{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    "unknown model": ({"model": "gpt-9", "prompt": "x"}, None, 404, "'gpt-9' does not exist"),
    "over the context": ({"model": NAME, "prompt": "x", "max_tokens": 100000}, None, 400,
                         "maximum context length is 512 tokens"),
    "temperature": ({"model": NAME, "prompt": "x", "temperature": 5}, None, 400, "temperature"),
    "top_p": ({"model": NAME, "prompt": "x", "top_p": 0}, None, 400, "top_p"),
    "max_tokens": ({"model": NAME, "prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    "n": ({"model": NAME, "prompt": "x", "n": 1000}, None, 400, "less than or equal to 16"),
    "missing prompt": ({"model": NAME}, None, 400, "prompt"),
    "empty prompt": ({"model": NAME, "prompt": ""}, None, 400, "prompt must not be empty"),
    "token id": ({"model": NAME, "prompt": [1, 10 ** 6]}, None, 400, "is not a token id"),
    "penalty": ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, None, 400, "presence_penalty"),
    "bool token ids": ({"model": NAME, "prompt": [True, False]}, None, 400, "prompt"),
    "top_k": ({"model": NAME, "prompt": "x", "top_k": 2 ** 63}, None, 400, "top_k"),
    "stop type": ({"model": NAME, "prompt": "x", "stop": [1, 2]}, None, 400, "stop"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_requests_get_openai_errors_naming_the_field(live, case):
    body, raw, status, words = BAD[case]
    response = _post(live, "/v1/completions", body, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] or error["param"] == words, error
    assert error["param"] is None or "str" not in error["param"].split(".")   # a field, not a union member
    assert "Traceback" not in response.text


def test_the_context_error_gives_the_numbers(live):
    error = _post(live, "/v1/completions", {"model": NAME, "prompt": "abcd", "max_tokens": 600}).json()["error"]
    assert "604 (4 in the prompt + 600 max_tokens)" in error["message"] and error["param"] == "max_tokens"


def test_bad_chat_requests(live):
    assert _post(live, "/v1/chat/completions", {"model": NAME, "messages": []}).status_code == 400
    response = _post(live, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]})
    assert response.status_code == 400 and "role" in response.json()["error"]["param"]
    assert _post(live, "/v1/nowhere", {}).status_code == 404


def test_the_api_key_is_required_when_set(compiled, tokenizer):
    server, engine = _serve(compiled, tokenizer, api_key=KEY)
    try:
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            wrong.completions.create(model=NAME, prompt="x", max_tokens=2)
        right = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert right.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(server.url + "/health").status_code == 200   # no key needed
    finally:
        server.close()


def test_overload_is_a_503_once_the_queue_is_full(compiled, tokenizer):
    server, engine = _serve(compiled, tokenizer, max_waiting=1)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                body = {"model": NAME, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(30)))

        statuses = [r.status_code for r in asyncio.run(main())]
        assert set(statuses) == {200, 503} and statuses.count(200) >= 1
        busy = next(r for r in asyncio.run(main()) if r.status_code == 503).json()["error"]
        assert "overloaded" in busy["message"]
        assert _pool_full(engine)
    finally:
        server.close()


def test_the_loop_refuses_past_its_bound_before_the_engine_sees_it(compiled):
    loop = EngineLoop(compiled.engine(), max_waiting=2)   # not started yet: submissions stay pending

    async def main():
        first = asyncio.ensure_future(loop.submit([Spec([1, 2], 2, {})]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="1 requests are waiting and this one adds 2"):
            await loop.submit([Spec([1, 2], 2, {}), Spec([3], 2, {})])
        first.cancel()                        # cancelled while its add is still queued
        await asyncio.sleep(0)
        loop.start(asyncio.get_running_loop())
        try:
            subs = await asyncio.wait_for(loop.submit([Spec([4, 5], 3, {"temperature": 0.0})]), 10)
            events = [await asyncio.wait_for(subs[0].events.get(), 10) for _ in range(3)]
            assert events[-1].finished and loop.alive
            deadline = time.monotonic() + 10
            while loop.engine.scheduler.requests and time.monotonic() < deadline:
                await asyncio.sleep(0.02)     # the cancelled caller's request is aborted, not left
            assert not loop.engine.scheduler.requests
        finally:
            loop.stop()

    asyncio.run(main())


def test_chat_template_refusals_pool_sized_defaults_and_request_counts(compiled, tokenizer):
    from jinja2 import TemplateError

    class Picky:
        """The test tokenizer with a template that refuses two user turns in a row."""
        chat_template = "x"

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

        def apply_chat_template(self, messages, **kwargs):
            if len(messages) > 1 and messages[-1]["role"] == messages[-2]["role"]:
                raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
            return tokenizer.apply_chat_template(messages, **kwargs)

    engine = compiled.engine(num_blocks=4, max_num_seqs=2, max_num_batched_tokens=64)   # 64 tokens of pool
    server = LiveServer(build_app(ServedModel(NAME, engine, Picky()), max_waiting=4))
    try:
        two = {"model": NAME, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
        error = _post((server,), "/v1/chat/completions", two)
        assert error.status_code == 400 and "roles must alternate" in error.json()["error"]["message"]
        one = {"model": NAME, "messages": [{"role": "user", "content": "a"}], "ignore_eos": True}
        done = _post((server,), "/v1/chat/completions", one)      # no max_tokens: what the pool holds
        assert done.status_code == 200, done.text
        usage = done.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 4 * engine.kv.block_size + 1
        many = _post((server,), "/v1/completions", {"model": NAME, "prompt": ["a", "b", "c"], "n": 2})
        assert many.status_code == 400 and "3 prompts x n=2 = 6 requests" in many.json()["error"]["message"]
    finally:
        server.close()


# --- text and the command line -------------------------------------------------------------------

def test_stop_matcher_holds_back_what_could_start_a_stop():
    from fusegen.serve.text import StopMatcher

    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == "abc"          # "E" may start "END"
    assert m.feed("N") == ""                # "EN" still may
    assert m.feed("o more") == "ENo more"   # it did not
    assert m.feed("tail x") == "tail "
    assert m.feed("yz") == "" and m.stopped and m.feed("after") == ""
    other = StopMatcher(["END"])
    assert other.feed("aE") == "a" and other.flush() == "E"


def test_incremental_detokenizer_waits_for_whole_characters(tokenizer):
    from fusegen.serve.text import IncrementalDetokenizer

    text = "añ☃ b"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode())           # one token per byte
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in ids]
    assert pieces == ["a", "", "ñ", "", "", "☃", " ", "b"]
    assert "".join(pieces) + detok.flush() == text


def test_serve_on_a_taken_port_is_a_one_line_error(capsys):
    from fusegen.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "/nonexistent", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]


def test_an_open_address_without_a_key_warns(capsys):
    from fusegen.serve.main import check_bind

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_bind("0.0.0.0", port, api_key=None)
    assert "without --api-key" in capsys.readouterr().err
    check_bind("0.0.0.0", port, api_key="k")
    check_bind("127.0.0.1", port, api_key=None)
    assert capsys.readouterr().err == ""


def test_a_client_that_falls_behind_gets_merged_chunks():
    from types import SimpleNamespace

    from fusegen.serve.app import _drain
    from fusegen.serve.choices import Delta
    from fusegen.serve.protocol import OpenAIError

    a, b = SimpleNamespace(index=0), SimpleNamespace(index=1)
    failed = OpenAIError(500, "boom")

    async def main():
        q: asyncio.Queue = asyncio.Queue()
        for item in [(a, Delta("x", [], None, [1])), (b, Delta("p", [], None, [7])),
                     (a, Delta("y", [], "length", [2])), (b, failed)]:
            q.put_nowait(item)
        return await _drain(q), q.empty()

    batch, empty = asyncio.run(main())
    assert empty and [(c.index, d if isinstance(d, OpenAIError) else (d.text, d.finish_reason, d.token_ids))
                      for c, d in batch] == [(0, ("xy", "length", [1, 2])), (1, ("p", None, [7])), (1, failed)]


def test_an_engine_failure_mid_request_is_an_error_the_server_survives(compiled, tokenizer):
    server, engine = _serve(compiled, tokenizer)
    forward, calls = engine.runner.forward, []

    def failing(entries):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("device fell over")
        return forward(entries)

    engine.runner.forward = failing
    try:
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        failed = _post((server,), "/v1/completions", body)
        assert failed.status_code == 500 and "device fell over" in failed.json()["error"]["message"]
        assert "Traceback" not in failed.text
        calls.clear()
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert any('"error"' in line and "device fell over" in line for line in lines)
        assert lines[-1] == "data: [DONE]"
        ok = _post((server,), "/v1/completions", {**body, "max_tokens": 5})   # and it serves on
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        assert _pool_full(engine)
    finally:
        server.close()


def test_streamed_chat_with_n_choices(client, compiled, tokenizer):
    messages = [{"role": "user", "content": "tell me"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=1.0,
                                                 seed=11, n=2, stream=True))
    for i in range(2):
        want = _reference(compiled, tokenizer, ids, 8, do_sample=True, temperature=1.0, seed=11 + i)[1]
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == want
        assert mine[-1].finish_reason in ("stop", "length")
