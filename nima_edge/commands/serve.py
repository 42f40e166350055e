"""nima-edge serve: the OpenAI-compatible HTTP server and chat page over any artifact."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import AllowCustomOps, Target, Threads


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        artifacts: list[Path] = typer.Argument(..., help="exported artifacts (or checkpoints); each is one model"),
        host: str = typer.Option("127.0.0.1", help="address to bind; 127.0.0.1 is this machine only, 0.0.0.0 the network"),
        port: int = typer.Option(8000, help="0 picks a free port"),
        api_key_file: Path = typer.Option(None, help="require the key on this file's first line "
                                                     "(or set NIMA_EDGE_API_KEY)"),
        cors_origin: list[str] = typer.Option([], help="allow browser pages from this origin (repeatable; "
                                                       "default: none)"),
        allowed_host: list[str] = typer.Option([], help="also answer to this Host name (repeatable; on a "
                                                        "loopback bind only loopback names are answered)"),
        queue_size: int = typer.Option(8, help="requests that may wait per model; more get 429"),
        max_tokens: int = typer.Option(1024, help="the largest max_tokens a request may ask for (the default)"),
        max_prompt_tokens: int = typer.Option(None, help="longest prompt in tokens (default: the context)"),
        max_body_kb: int = typer.Option(1024, help="largest request body"),
        profile: str = typer.Option("desktop-cpu", help="benchmark profile whose budget the chat page shows"),
        target: Target = None,
        threads: Threads = None,
        allow_custom_ops: AllowCustomOps = False,
    ):
        """Serve artifacts over an OpenAI-compatible API (/v1/chat/completions, /v1/completions) with a chat page."""
        from nima_edge.benchmarks.harness import load_profile
        from nima_edge.errors import NimaError
        from nima_edge.serve.app import Limits
        from nima_edge.serve.launch import read_api_key, serve as run_server

        for name, value, least in (("--queue-size", queue_size, 0), ("--max-tokens", max_tokens, 1),
                                   ("--max-prompt-tokens", max_prompt_tokens or 1, 1),
                                   ("--max-body-kb", max_body_kb, 1)):
            if value < least:
                raise NimaError(f"{name} {value} is below {least}", f"pass {name} {least} or more")
        prof = load_profile(profile)
        console = Console(stderr=True, highlight=False)
        run_server(artifacts, host, port, target, threads, read_api_key(api_key_file), cors_origin, allowed_host,
                   Limits(queue_size, max_body_kb * 1024, max_tokens, max_prompt_tokens),
                   {"tokens": prof.new_tokens, "ms": prof.budget_ms, "profile": prof.name},
                   say=lambda line: console.print(line, markup=False), allow_custom_ops=allow_custom_ops)
