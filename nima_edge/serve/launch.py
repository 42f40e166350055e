"""Start the server: load each artifact through load_runtime, bind, run uvicorn.

The API key comes from the NIMA_EDGE_API_KEY environment variable or a file (never argv, where `ps`
shows it to every user). A loopback bind answers only to loopback Host names (DNS rebinding); another
bind without a key gets a warning.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable

from nima_edge.errors import NimaError
from nima_edge.serve.app import Limits, Settings, create_app
from nima_edge.serve.guards import LOOPBACK_NAMES, is_loopback

API_KEY_ENV = "NIMA_EDGE_API_KEY"


def read_api_key(key_file: Path | None) -> str | None:
    """The key from `key_file` (first line, stripped) or else from $NIMA_EDGE_API_KEY; None: no key."""
    if key_file is not None:
        try:
            text = key_file.read_text().strip()
        except OSError as e:
            raise NimaError(f"cannot read the API key file {key_file}: {e.strerror}", "check the path") from e
        key = text.splitlines()[0].strip() if text else ""
        if not key:
            raise NimaError(f"the API key file {key_file} is empty", "write the key on its first line")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if is_loopback(host) or api_key:
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this machine can use the "
            f"models (set {API_KEY_ENV} or --api-key-file)")


def model_ids(paths: list[Path]) -> list[str]:
    """Model ids for the API: the file's stem or the folder's name; they must differ."""
    ids = [p.stem if p.is_file() else p.resolve().name for p in paths]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise NimaError(f"two artifacts would both be called {dup[0]!r}", "give the artifacts distinct names")
    return ids


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NimaError(f"cannot listen on {host}:{port}: {e.strerror}",
                        "pick another --port (0 picks a free one) or stop the other server") from e
    sock.listen(128)
    return sock


def serve(artifacts: list[Path], host: str = "127.0.0.1", port: int = 8000, target: str | None = None,
          threads: int | None = None, api_key: str | None = None, cors_origins: list[str] | None = None,
          allowed_hosts: list[str] | None = None, limits: Limits | None = None, budget: dict | None = None,
          say: Callable[[str], None] = print, allow_custom_ops: bool = False) -> None:
    import uvicorn

    from nima_edge.runtimes import load_runtime

    if target and len(artifacts) > 1:
        raise NimaError("--target applies to one artifact", "serve one artifact per --target, or drop --target")
    names = model_ids(artifacts)
    sock = bind(host, port)  # before loading: a busy port fails fast
    runtimes = {}
    try:
        for name, path in zip(names, artifacts):
            runtimes[name] = load_runtime(path, target, threads=threads, allow_custom_ops=allow_custom_ops)
    except BaseException:
        for rt in runtimes.values():
            rt.close()
        sock.close()
        raise
    # loopback: only loopback names (plus any the user adds); elsewhere any Host unless names are given
    hosts = set(allowed_hosts or [])
    allowed = hosts | set(LOOPBACK_NAMES) if is_loopback(host) else (hosts or None)
    settings = Settings(api_key=api_key, cors_origins=list(cors_origins or []), allowed_hosts=allowed,
                        limits=limits or Limits(), budget=budget or Settings().budget)
    app = create_app(runtimes, settings)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    for name, rt in runtimes.items():
        say(f"{name}: {rt.target}, context {rt.context_length} tokens")
    if warning := exposure_warning(host, api_key):
        say(warning)
    say(f"serving on http://{shown}:{bound}/ (chat page) and http://{shown}:{bound}/v1 (OpenAI API); Ctrl-C stops")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
