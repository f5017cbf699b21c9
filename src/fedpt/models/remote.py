"""The large LM behind a socket: a ``LogitSource`` that asks ``fedpt serve`` for full next-token logits.

FedPT's server never sees the large model's weights with this backend, only its logits. The
service (``fedpt.serving``) keeps one KV cache per decoding session, so a decoding step sends
one token per row and gets back one (B, V) tensor, as raw bf16/fp16/fp32 bytes with its shape
and dtype in headers (a 150k-token vocabulary is 300 KB per row in bf16; JSON floats would be
several MB and slow to parse). No pickle on the wire: token ids go as JSON, logits as bytes.

    POST   /v1/logits/sessions               {"input_ids", "attention_mask"} -> logits (B, V), X-Session-Id
    POST   /v1/logits/sessions/{id}/step     {"tokens", "step"}             -> logits (B, V)
    DELETE /v1/logits/sessions/{id}
    POST   /v1/logits/score                  {"input_ids", "attention_mask", "keep_last"} -> (B, K, V)
    GET    /v1/logits/info                   model name, vocab size, vocabulary hash, limits

Transport failures and 502/503/504 are retried with exponential backoff a bounded number of
times; after that, one ``FedPTError`` names the service and what to do. A step carries its
index, so a retried step the server already applied is answered from its cache, not applied twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from fedpt.errors import FedPTError, ServiceError

WIRE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHAPE_HEADER, DTYPE_HEADER, SESSION_HEADER = "X-FedPT-Shape", "X-FedPT-Dtype", "X-FedPT-Session"
RETRY_STATUS = (502, 503, 504)


def tensor_to_bytes(tensor: torch.Tensor, dtype: str) -> tuple[bytes, dict[str, str]]:
    """Raw little-endian bytes of ``tensor`` in ``dtype`` and the headers that describe them."""
    wire = tensor.detach().to(WIRE_DTYPES[dtype]).contiguous()
    # numpy has no bfloat16: reinterpret the bits as int16 to get at the bytes
    raw = (wire.view(torch.int16) if dtype == "bfloat16" else wire).numpy().tobytes()
    return raw, {SHAPE_HEADER: ",".join(map(str, wire.shape)), DTYPE_HEADER: dtype}


def bytes_to_tensor(raw: bytes, headers: Any) -> torch.Tensor:
    """fp32 tensor from a logits response (inverse of ``tensor_to_bytes``)."""
    dtype = headers.get(DTYPE_HEADER)
    if dtype not in WIRE_DTYPES:
        raise FedPTError(f"the logits service answered with dtype {dtype!r}; expected one of {', '.join(WIRE_DTYPES)}")
    shape = [int(n) for n in headers.get(SHAPE_HEADER, "").split(",") if n]
    flat = torch.frombuffer(bytearray(raw), dtype=WIRE_DTYPES[dtype]) if raw else torch.empty(0)
    if flat.numel() != (torch.Size(shape).numel() if shape else 0):
        raise FedPTError(f"the logits service sent {flat.numel()} values for shape {shape}: truncated response")
    return flat.reshape(shape).float()


@dataclass
class RetryPolicy:
    attempts: int = 5  # tries per request, the first included
    backoff: float = 0.5  # seconds before the second try, doubling after each failure
    timeout: float = 300.0  # seconds per request (a long prefill on a busy CPU is slow)


class LogitsService:
    """An HTTP connection to a ``fedpt serve`` logits endpoint, with bounded retries."""

    def __init__(self, url: str, api_key: str | None = None, retry: RetryPolicy | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=self.retry.timeout)

    def request(self, method: str, path: str, json: dict | None = None) -> Any:
        """One request; retried on transport errors and 502/503/504, FedPTError on anything else."""
        import httpx

        delay, last = self.retry.backoff, ""
        for attempt in range(self.retry.attempts):
            try:
                response = self.client.request(method, path, json=json)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if response.status_code not in RETRY_STATUS:
                    if response.status_code >= 400:
                        raise FedPTError(f"the logits service at {self.url} refused {method} {path} "
                                         f"(HTTP {response.status_code}): {_error_message(response)}")
                    return response
                last = f"HTTP {response.status_code}"
            if attempt < self.retry.attempts - 1:
                time.sleep(delay)
                delay *= 2
        raise ServiceError(f"the logits service at {self.url} did not answer after {self.retry.attempts} tries "
                         f"({last}); start it (`fedpt serve --model ...`) or fix model.large_url")

    def info(self) -> dict[str, Any]:
        return self.request("GET", "/v1/logits/info").json()

    def logits(self, path: str, body: dict) -> tuple[torch.Tensor, Any]:
        response = self.request("POST", path, json=body)
        return bytes_to_tensor(response.content, response.headers), response.headers

    def close(self) -> None:
        self.client.close()


def _error_message(response: Any) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message", error))
    except ValueError:
        return response.text[:200]


class RemoteLogitSource:
    """``LogitSource`` over a ``LogitsService``: one server-side session (KV cache) per prefill."""

    remote = True  # computes elsewhere: the proxy runs the small LM while it waits (``ProxyTunedLM``)

    def __init__(self, service: LogitsService, dtype: str | None = None) -> None:
        self.service, self.dtype = service, dtype  # dtype None: the service's own (lossless)
        self._session: str | None = None
        self._steps = 0

    def _body(self, **fields: Any) -> dict[str, Any]:
        return fields | ({"dtype": self.dtype} if self.dtype else {})

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.close()
        logits, headers = self.service.logits("/v1/logits/sessions", self._body(
            input_ids=input_ids.tolist(), attention_mask=attention_mask.tolist()))
        self._session, self._steps = headers[SESSION_HEADER], 0
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._session is None:
            raise RuntimeError("step() before prefill()")
        logits, _ = self.service.logits(f"/v1/logits/sessions/{self._session}/step",
                                        self._body(tokens=tokens.tolist(), step=self._steps))
        self._steps += 1
        return logits

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        logits, _ = self.service.logits("/v1/logits/score", self._body(
            input_ids=input_ids.tolist(), attention_mask=attention_mask.tolist(), keep_last=keep_last))
        return logits

    def close(self) -> None:
        """End the server-side session (frees its KV cache); a lost close only waits for the idle expiry."""
        session, self._session = self._session, None
        if session is not None:
            try:
                self.service.client.delete(f"/v1/logits/sessions/{session}")
            except Exception:  # noqa: BLE001 - the server expires idle sessions anyway
                pass


def read_api_key(path: str) -> str | None:
    """The API key in ``path`` (first line), or None for no path."""
    from pathlib import Path

    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise FedPTError(f"API key file {file} does not exist")
    key = file.read_text().strip().splitlines()
    if not key or not key[0].strip():
        raise FedPTError(f"API key file {file} is empty: put the key on its first line")
    return key[0].strip()


def check_remote_width(service: LogitsService, small_base: Any, small_spec: str) -> None:
    """The service's logit width must equal the small LM's (as ``check_logit_width`` does locally)."""
    width = small_base.get_output_embeddings().weight.shape[0]
    info = service.info()
    if info.get("vocab_size") != width:
        raise FedPTError(f"small model '{small_spec}' outputs {width} logits but the large LM at {service.url} "
                         f"('{info.get('model')}') outputs {info.get('vocab_size')}; proxy-tuning needs equal widths")


def check_remote_vocabulary(url: str, api_key_file: str, small_spec: str) -> dict[str, Any]:
    """Preflight: the service's vocabulary hash must equal the small LM tokenizer's; returns its info."""
    from fedpt.models.loading import load_tokenizer, vocabulary_hash

    service = LogitsService(url, read_api_key(api_key_file), RetryPolicy(attempts=3))
    try:
        info = service.info()
    finally:
        service.close()
    if info.get("vocab_sha256") != vocabulary_hash(load_tokenizer(small_spec)):
        raise FedPTError(f"the large LM at {url} ('{info.get('model')}') uses a different vocabulary than small "
                         f"model '{small_spec}'; proxy-tuning needs one shared vocabulary: serve a model of the "
                         "same family")
    return info
