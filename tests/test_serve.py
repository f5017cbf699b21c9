"""``fedpt serve`` as users meet it: real server processes on 127.0.0.1, called with the official
``openai`` client (and raw HTTP for the error cases), answers checked against the tiny model run
directly through transformers (an independent code path: no fedpt decoding, no KV cache)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fedpt.serving.launch import ServeProcess, launch  # noqa: E402

API_KEY = "test-key-123"
START_TIMEOUT = 300  # seconds: importing torch+transformers on a busy 2-core box is slow


def start_server(args: list[str], home: str) -> ServeProcess:
    """``fedpt serve ... --port 0`` on one thread with the tests' model cache; returns once it answers."""
    return launch(["--threads", "1", *args], env=os.environ | {"FEDPT_HOME": home, "OMP_NUM_THREADS": "1"},
                  timeout=START_TIMEOUT)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "key.txt"
    path.write_text(API_KEY + "\n")
    return path


@pytest.fixture(scope="module")
def server(fedpt_home, key_file):
    """tiny-large in fp32, API key on, small limits so that 413s are cheap to provoke."""
    served = start_server(["--model", "tiny-large", "--dtype", "float32", "--api-key-file", str(key_file),
                           "--max-prompt-tokens", "200", "--max-new-tokens", "64", "--max-batch", "4",
                           "--max-body-bytes", "20000", "--max-logprobs", "20", "--max-sessions", "2"], fedpt_home)
    yield served.url
    served.stop()
    assert not served.log.exists()  # the launcher's own temporary log goes with the server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def large(fedpt_home):
    from fedpt.models.loading import load_model, load_tokenizer

    return load_tokenizer("tiny-large"), load_model("tiny-large", "float32")


def reference_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by full re-forwards (no cache) and the log-softmax rows they came from (n, V)."""
    ids, rows = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            rows.append(logp)
            ids.append(int(logp.argmax()))
    return ids[len(prompt_ids):], torch.stack(rows)


PROMPT = "Below is an instruction that describes a task."


def test_completion_greedy_logprobs_match_the_model(client, large):
    tokenizer, model = large
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    expected, logp = reference_greedy(model, prompt_ids, 6)
    out = client.completions.create(model="tiny-large", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5,
                                    extra_body={"return_tokens_as_token_ids": True})
    choice = out.choices[0]
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    assert not eos & set(expected), "pick another prompt: the reference hit EOS"
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in expected]
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens == len(prompt_ids)
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs),
                               logp[torch.arange(6), torch.tensor(expected)], atol=1e-4, rtol=0)
    for row, top in zip(logp, choice.logprobs.top_logprobs):
        best = row.topk(5)
        assert list(top) == [f"token_id:{i}" for i in best.indices.tolist()]  # greedy: the chosen one is the best
        torch.testing.assert_close(torch.tensor(list(top.values())), best.values, atol=1e-4, rtol=0)


def test_echo_scores_prompt_token_ids(client, large):
    """max_tokens=0 + echo + logprobs: each prompt token's log-probability given the ones before it."""
    tokenizer, model = large
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    out = client.completions.create(model="tiny-large", prompt=ids, max_tokens=0, echo=True, logprobs=3,
                                    extra_body={"return_tokens_as_token_ids": True})
    logprobs = out.choices[0].logprobs
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
    assert logprobs.tokens == [f"token_id:{t}" for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:]),
                               logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], atol=1e-4, rtol=0)
    for t, top in enumerate(logprobs.top_logprobs[1:]):
        best = [f"token_id:{i}" for i in logp[t].topk(3).indices.tolist()]
        assert list(top)[:3] == best and len(top) <= 4  # top-3, plus the actual token when outside it
    assert out.choices[0].text == tokenizer.decode(ids)
    # echo with generation: the prompt's entries come first, then the generated token's
    both = client.completions.create(model="tiny-large", prompt=ids, max_tokens=1, echo=True, logprobs=2,
                                     temperature=0, extra_body={"return_tokens_as_token_ids": True})
    assert both.choices[0].logprobs.tokens[:-1] == logprobs.tokens
    assert both.choices[0].logprobs.tokens[-1] == f"token_id:{int(logp[-1].argmax())}"


def test_streaming_equals_non_streaming_and_stop_strings(client):
    full = client.completions.create(model="tiny-large", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)
    chunks = list(client.completions.create(model="tiny-large", prompt=PROMPT, max_tokens=12, temperature=0,
                                            logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] \
        == full.choices[0].logprobs.tokens
    assert chunks[-1].choices[0].finish_reason == "length"
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.completions.create(model="tiny-large", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-large", prompt=PROMPT, max_tokens=12, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sampling_is_seeded_and_batches_prompts(client):
    kwargs = dict(model="tiny-large", max_tokens=8, temperature=1.0, top_p=0.9)
    a = client.completions.create(prompt=[PROMPT, "The"], seed=7, **kwargs)
    b = client.completions.create(prompt=[PROMPT, "The"], seed=7, **kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    greedy = client.completions.create(model="tiny-large", prompt=[PROMPT, "The"], max_tokens=8, temperature=0)
    alone = client.completions.create(model="tiny-large", prompt="The", max_tokens=8, temperature=0)
    assert greedy.choices[1].text == alone.choices[0].text  # left padding does not change a row's answer


def test_chat_completions_with_logprobs(client, large):
    tokenizer, model = large
    from fedpt.serving.models import CHATML

    messages = [{"role": "user", "content": "Name a color."}]
    ids = tokenizer.apply_chat_template(messages, chat_template=tokenizer.chat_template or CHATML,
                                        tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    expected, logp = reference_greedy(model, ids, 5)
    out = client.chat.completions.create(model="tiny-large", messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert out.choices[0].message.role == "assistant"
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in expected]
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]),
                               logp[torch.arange(5), torch.tensor(expected)], atol=1e-4, rtol=0)
    assert all(len(c.top_logprobs) == 2 for c in content)
    stream = client.chat.completions.create(model="tiny-large", messages=messages, max_tokens=5, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def _post(server: str, path: str, body: dict | bytes, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(server + path, content=body, headers=headers | {"Content-Type": "application/json"},
                          timeout=60)
    return httpx.post(server + path, json=body, headers=headers, timeout=60)


def _assert_clean(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert words in message and "Traceback" not in response.text, message


def test_bad_requests_get_clean_errors(server, client):
    body = {"model": "tiny-large", "prompt": "hi", "max_tokens": 2}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).completions.create(**body)
    _assert_clean(_post(server, "/v1/completions", body, key=None), 401, "API key")
    _assert_clean(_post(server, "/v1/logits/info", {}, key="nope"), 401, "API key")
    # 413: over each configured limit
    _assert_clean(_post(server, "/v1/completions", body | {"prompt": list(range(201))}), 413, "limit is 200")
    _assert_clean(_post(server, "/v1/completions", body | {"max_tokens": 65}), 413, "limit of 64")
    _assert_clean(_post(server, "/v1/completions", body | {"prompt": ["a"] * 5}), 413, "limit is 4")
    _assert_clean(_post(server, "/v1/completions", body | {"logprobs": 21}), 413, "limit of 20")
    _assert_clean(_post(server, "/v1/completions", b'{"prompt": "' + b"x" * 30000 + b'"}'), 413, "20000 bytes")
    # 422: invalid values, with what is wrong
    _assert_clean(_post(server, "/v1/completions", body | {"prompt": [5, 2048]}), 422, "token id 2048")
    _assert_clean(_post(server, "/v1/completions", body | {"prompt": [-1]}), 422, "token id -1")
    _assert_clean(_post(server, "/v1/completions", body | {"temperature": 5}), 422, "temperature")
    _assert_clean(_post(server, "/v1/completions", body | {"n": 3}), 422, "n")
    _assert_clean(_post(server, "/v1/completions", body | {"alpha": 1.0}), 422, "alpha")
    _assert_clean(_post(server, "/v1/completions", b"{not json"), 422, "invalid request")
    _assert_clean(_post(server, "/v1/chat/completions", {"messages": []}), 422, "messages")
    _assert_clean(_post(server, "/v1/logits/sessions", {"input_ids": [[1, 2], [3]]}), 422, "equal shape")
    _assert_clean(_post(server, "/v1/completions", body | {"model": "gpt-4"}), 404, "not served here")
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny-large", prompt=[99999], max_tokens=1)


def test_logits_service_equals_the_local_model(server, large, fedpt_home):
    """Sessions (prefill + steps), scoring, dtype on the wire, idempotent step retries, session limit."""
    from fedpt.errors import FedPTError
    from fedpt.models.loading import load_tokenizer, vocabulary_hash
    from fedpt.models.logits import LocalLogitSource
    from fedpt.models.remote import LogitsService, RemoteLogitSource

    _, model = large
    service = LogitsService(server, API_KEY)
    info = service.info()
    assert info["vocab_size"] == 2048 and info["vocab_sha256"] == vocabulary_hash(load_tokenizer("tiny-small"))
    ids = torch.tensor([[0, 0, 17, 30, 41], [50, 60, 70, 80, 90]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    remote, local = RemoteLogitSource(service), LocalLogitSource(model)
    a, b = remote.prefill(ids, mask), local.prefill(ids, mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # fp32 model, fp32 wire: the very same numbers
    for _ in range(3):
        tokens = b.argmax(-1)
        a, b = remote.step(tokens), local.step(tokens)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a retried step (same index) is answered from the cache, not applied twice
    again = service.logits(f"/v1/logits/sessions/{remote._session}/step", {"tokens": tokens.tolist(), "step": 2})[0]
    torch.testing.assert_close(again, a, atol=0, rtol=0)
    with pytest.raises(FedPTError, match="out of order"):
        service.logits(f"/v1/logits/sessions/{remote._session}/step", {"tokens": tokens.tolist(), "step": 7})
    torch.testing.assert_close(remote.score(ids, mask, keep_last=2), local.score(ids, mask, keep_last=2),
                               atol=0, rtol=0)
    half = RemoteLogitSource(service, dtype="bfloat16").score(ids, mask)
    torch.testing.assert_close(half, local.score(ids, mask), atol=0.05, rtol=0.01)  # bf16 rounding only
    # at most --max-sessions=2 open; closing one frees its slot; a closed session is gone
    other = RemoteLogitSource(service)
    other.prefill(ids, mask)
    with pytest.raises(FedPTError, match="429"):
        RemoteLogitSource(service).prefill(ids, mask)
    sid = remote._session
    remote.close()
    with pytest.raises(FedPTError, match="404"):
        service.logits(f"/v1/logits/sessions/{sid}/step", {"tokens": tokens.tolist(), "step": 3})
    third = RemoteLogitSource(service)
    third.prefill(ids, mask)
    third.close()
    other.close()
    service.close()


def test_service_down_is_one_clear_error_after_bounded_retries():
    import socket

    from fedpt.errors import FedPTError
    from fedpt.models.remote import LogitsService, RemoteLogitSource, RetryPolicy

    with socket.socket() as sock:  # a port nobody listens on (bound, not listening: connections are refused)
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        service = LogitsService(url, retry=RetryPolicy(attempts=3, backoff=0.01))
        with pytest.raises(FedPTError, match="did not answer after 3 tries"):
            RemoteLogitSource(service).prefill(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))


def test_engine_interleaves_concurrent_requests(fedpt_home):
    """The worker gives each active request a token per turn: B's first token comes before A's
    last, whatever the request lengths. ``gang=2`` (the worker starts once both are in) makes the
    order deterministic; this is the real worker thread on the tiny model."""
    from fedpt.proxy import Decoding
    from fedpt.serving.engine import Engine, GenerationRequest
    from fedpt.serving.models import load_plain

    served = load_plain("tiny-large", "float32")
    engine = Engine(served, gang=2)
    order: list[tuple[str, str]] = []
    finished = {name: threading.Event() for name in "AB"}

    def deliver(name):
        def put(event):
            order.append((name, event.kind))
            if event.kind in ("done", "error"):
                finished[name].set()
        return put

    ids = served.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    for name, steps in (("A", 6), ("B", 3)):
        engine.submit(GenerationRequest([ids], Decoding(max_new_tokens=steps), deliver(name)))
    assert all(event.wait(120) for event in finished.values())
    steps = [name for name, kind in order if kind == "step"]
    assert ("A", "error") not in order and ("B", "error") not in order
    assert steps == ["A", "B", "A", "B", "A", "B", "A", "A", "A"]


class GatedSource:
    """The served model's LogitSource with two changes a test can rely on, on any CPU.

    It never picks a stop token (their logits are -inf), so every answer runs to ``max_tokens``.
    While ``armed``, a request's second token waits until the *client* has received the other
    request's first token (``received[other]``): a server that interleaves requests gets past that
    at once; one that finishes one request before it starts the next cannot, and the waiting
    request ends in an error after ``GATE_SECONDS`` (a limit only a broken server reaches).
    """

    GATE_SECONDS = 60.0

    def __init__(self, source, stop_ids: list[int], names: dict[tuple[int, ...], str],
                 received: dict[str, threading.Event], armed: bool) -> None:
        self.source, self.stop_ids, self.names, self.received, self.armed = source, stop_ids, names, received, armed
        self.name: str | None = None
        self.steps = 0

    def _no_stop(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., self.stop_ids] = float("-inf")
        return logits

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.name = self.names.get(tuple(input_ids[0].tolist()))
        return self._no_stop(self.source.prefill(input_ids, attention_mask))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.armed and self.steps == 1:
            other = next(n for n in self.received if n != self.name)
            if not self.received[other].wait(self.GATE_SECONDS):
                raise RuntimeError(f"{self.name}'s second token waited for {other}'s first, which never came")
        return self._no_stop(self.source.step(tokens))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        return self._no_stop(self.source.score(input_ids, attention_mask, keep_last))

    def close(self) -> None:
        self.source.close()


def serve_in_thread(app):
    """uvicorn serving ``app`` on a free loopback port in a thread of this process; (url, stop)."""
    import socket
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        sock.close()

    deadline = time.monotonic() + 60
    while not server.started:  # wait for the condition, not for a time
        if not thread.is_alive() or time.monotonic() > deadline:
            stop()
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.05)
    return url, stop


def test_concurrent_streams_progress_together(fedpt_home, request):
    """Two clients stream at once from the real app (``create_app``, ``--gang 2``: the worker starts
    once both requests are in) over HTTP; both must have received a token before either stream
    ends, and both get exactly the answer they get alone.

    No timing decides it: the served model (``GatedSource``) holds each request's second token
    until the client has the other's first, so the client-side order below is forced for a server
    that interleaves requests, and a server that serves one request after the other makes the
    first one fail (it cannot get past its gate). Stop tokens are ruled out, so both answers run
    to max_tokens whatever the CPU's rounding."""
    from fedpt.serving.app import create_app
    from fedpt.serving.models import load_plain

    served = load_plain("tiny-large", "float32")
    prompts = {"A": PROMPT, "B": "The capital of France"}
    names = {tuple(served.tokenizer(p, add_special_tokens=False)["input_ids"]): k for k, p in prompts.items()}
    assert len(names) == 2
    received = {k: threading.Event() for k in prompts}
    armed = [False]
    plain_source = served.source
    served.source = lambda alpha=None: GatedSource(plain_source(alpha), served.eos_ids, names, received, armed[0])
    clients = {}
    for gang in (1, 2):  # --gang 1 for the answers alone (a gang of 2 waits for a second request)
        url, stop = serve_in_thread(create_app(served, gang=gang))
        request.addfinalizer(stop)
        clients[gang] = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    max_tokens = 6

    def stream(name: str, gang: int = 2):
        """Each chunk of ``name``'s answer: (token count, text, finish reason)."""
        for chunk in clients[gang].completions.create(model="tiny-large", prompt=prompts[name], temperature=0,
                                                      max_tokens=max_tokens, logprobs=0, stream=True):
            choice = chunk.choices[0]  # logprobs=0: every step is a chunk, even one whose text is held back
            yield len(choice.logprobs.tokens) if choice.logprobs else 0, choice.text, choice.finish_reason

    # Alone, one request after the other; the gates are not armed.
    alone = {k: list(stream(k, gang=1)) for k in prompts}
    for chunks in alone.values():
        assert sum(n for n, _, _ in chunks) == max_tokens and chunks[-1][2] == "length"

    armed[0] = True
    order: list[tuple[str, str]] = []  # (stream, "token" or "end"), in the order the client got them
    lock = threading.Lock()
    together: dict[str, list] = {}
    errors: list[BaseException] = []

    def read(name: str) -> None:
        try:
            chunks = []
            for chunk in stream(name):
                chunks.append(chunk)
                with lock:
                    order.extend([(name, "token")] * chunk[0])
                if chunk[0]:
                    received[name].set()
            with lock:
                order.append((name, "end"))
            together[name] = chunks
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=read, args=(name,)) for name in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert together == alone
    for name, other in (("A", "B"), ("B", "A")):
        assert order.count((name, "token")) == max_tokens
        assert order.index((other, "token")) < order.index((name, "end")), order


def test_serve_bad_arguments_are_one_line(tmp_path, capsys):
    from fedpt.cli import main

    assert main(["serve", "--run", str(tmp_path)]) == 2
    assert "is not a fedpt run directory" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny-large", "--api-key-file", str(tmp_path / "missing.txt")]) == 2
    assert "API key file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["serve", "--model", "tiny-large", "--api-key-file", str(tmp_path / "empty.txt")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny-large", "--system", "fedpt"]) == 2
    assert "use it with --run" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny-large", "--max-batch", "0"]) == 2
    assert "--max-batch must be positive" in capsys.readouterr().err
