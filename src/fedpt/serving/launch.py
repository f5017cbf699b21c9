"""Start ``fedpt serve`` as a child process, wait until it answers, and stop exactly it.

Tests, benchmarks and scripts that need a real server on loopback share this one way in: the
server binds ``--port 0`` (the OS picks a free port) and announces its address on its first
stdout line; ``launch`` reads it, then waits for ``/v1/models`` to answer (bound is not yet
accepting). The server runs in a process group of its own, so ``stop`` ends it and only it.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedpt.errors import FedPTError


@dataclass
class ServeProcess:
    process: subprocess.Popen
    url: str  # e.g. http://127.0.0.1:40123; the OpenAI API is under /v1
    log: Path  # the server's stderr
    temporary_log: bool = False  # made by the launcher for this server alone: removed by ``stop``

    def stop(self, timeout: float = 30.0, keep_log: bool = False) -> None:
        """SIGTERM to the server's own process group, SIGKILL if it has not exited after ``timeout``."""
        stop_process_group(self.process, timeout)
        if self.temporary_log and not keep_log:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            process.wait()
    if process.stdout:
        process.stdout.close()


def launch(args: list[str], env: dict[str, str] | None = None, log: Path | None = None,
           timeout: float = 900.0) -> ServeProcess:
    """``fedpt serve --host 127.0.0.1 --port 0 ARGS``; returns once it answers HTTP.

    ``timeout`` covers loading the model (minutes for a real one on a busy 2-core machine).
    Raises FedPTError (with the end of the server's log) if it exits or stays silent.
    """
    import httpx

    log, temporary = _log_file(log, "fedpt-serve-")
    env = (os.environ if env is None else env) | {"PYTHONUNBUFFERED": "1"}
    with log.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "fedpt.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                                    *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                   start_new_session=True)
    server = ServeProcess(process, "", log, temporary_log=temporary)
    deadline = time.monotonic() + timeout
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=timeout)  # "serving NAME at http://127.0.0.1:PORT (...)"
        except queue.Empty:
            raise FedPTError(f"fedpt serve printed nothing in {timeout:.0f} s; see {log}") from None
        if not first.startswith("serving "):
            process.wait(timeout=30)
            raise FedPTError(f"fedpt serve did not start: {_tail(log)}")
        server.url = first.split(" at ", 1)[1].split()[0]
        while True:  # wait for the condition (an HTTP answer, 401 included), not for a time
            if process.poll() is not None:
                raise FedPTError(f"fedpt serve exited with {process.returncode}: {_tail(log)}")
            try:
                httpx.get(server.url + "/v1/models", timeout=30)
                return server
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise FedPTError(f"fedpt serve at {server.url} did not answer in {timeout:.0f} s") from None
                time.sleep(0.1)
    except BaseException:
        server.stop(keep_log=True)  # the error may point at it
        raise


def launch_llama_cpp_server(gguf: Path, threads: int = 1, log: Path | None = None, timeout: float = 300.0,
                            args: list[str] | None = None) -> ServeProcess:
    """llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``, the
    ``[llamacpp]`` extra) on 127.0.0.1 with a GGUF file: a third-party top-k black box for FedPT's
    ``openai`` backend (tests, ``bench/topk_fidelity.py --server llama-cpp-python``). Uvicorn binds
    port 0 and logs the port it got; the server runs in a process group of its own (``stop``)."""
    import re

    import httpx

    log, temporary = _log_file(log, "llama-cpp-server-")
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", "0",
             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "False", *(args or [])],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServeProcess(process, "", log, temporary_log=temporary)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise FedPTError(f"llama_cpp.server exited with {process.returncode}: {_tail(log)}")
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
            if found:
                server.url = found.group(1)
                try:
                    httpx.get(server.url + "/v1/models", timeout=30)
                    return server
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise FedPTError(f"llama_cpp.server did not answer in {timeout:.0f} s; see {log}")
            time.sleep(0.1)
    except BaseException:
        server.stop(keep_log=True)  # the error may point at it
        raise


def _log_file(log: Path | None, prefix: str) -> tuple[Path, bool]:
    """``log``, or a temporary file the server's ``stop`` removes (the bool says which)."""
    if log is not None:
        return log, False
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(handle)
    return Path(name), True


def _tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " | ".join(text[-lines:]) or "(no output)"
