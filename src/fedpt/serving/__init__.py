"""``fedpt serve``: a model, or a finished run's proxy-tuned large LM, behind an OpenAI-compatible API
plus a binary logits service for FedPT's remote large-LM backend (``fedpt.serving.app``).

    fedpt serve --model tiny-large --port 8000
    fedpt serve --run runs/default --system fedpt --api-key-file key.txt
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from fedpt.errors import FedPTError

STOP_GRACE_SECONDS = 10  # open requests' time to finish after SIGTERM / Ctrl-C


def serve(model: str | None, run: Path | None, system: str | None, host: str, port: int, api_key_file: str,
          dtype: str | None, threads: int, name: str | None, gang: int, limits=None) -> None:
    """Load, bind, print the address (the first stdout line: ``serving <name> at http://host:port``), serve."""
    import torch
    import uvicorn

    from fedpt.models.remote import read_api_key
    from fedpt.serving.app import create_app
    from fedpt.serving.models import load_plain, load_run

    api_key = read_api_key(api_key_file)
    if threads:
        torch.set_num_threads(threads)
    served = load_run(run, system, dtype, name) if run else load_plain(model, dtype or "auto", name)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise FedPTError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port "
                         "(0 picks a free one)") from None
    sock.listen(2048)  # listening before the address is announced: clients may connect right away
    bound = sock.getsockname()[1]
    print(f"serving {served.name} at http://{host}:{bound} (OpenAI API under /v1; "
          f"{'API key required' if api_key else 'no API key'})", flush=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without --api-key-file: anyone who can reach it can use it",
              file=sys.stderr, flush=True)
    app = create_app(served, limits=limits, api_key=api_key, gang=gang)
    # SIGTERM / Ctrl-C: uvicorn stops taking requests and gives open ones STOP_GRACE_SECONDS, then
    # re-raises the signal, which fedpt.stopping (installed by the CLI) turns into a clean exit.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=STOP_GRACE_SECONDS))
    server.run(sockets=[sock])
