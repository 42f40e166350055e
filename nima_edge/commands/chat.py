"""nima-edge chat: a streaming terminal chat over any runtime (nima-edge serve is commands/serve.py)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import AllowCustomOps, Seed, Target, Temperature, Threads, TopK, TopP
from nima_edge.sampling import Sampling

HELP = ("commands: /system TEXT sets the system prompt, /reset clears the history, /exit (or Ctrl-D) leaves; "
        "Ctrl-C stops a reply")


def register(app: typer.Typer) -> None:
    @app.command()
    def chat(
        model: Path = typer.Argument(..., help="a .gguf file, another exported artifact, or a checkpoint"),
        system: str = typer.Option("", help="system prompt"),
        max_new_tokens: int = typer.Option(256, help="longest reply (at most half the context)"),
        temperature: Temperature = 0.7,
        top_k: TopK = 40,
        top_p: TopP = 0.95,
        seed: Seed = None,
        target: Target = None,
        threads: Threads = None,
        allow_custom_ops: AllowCustomOps = False,
    ):
        """Chat with a model in the terminal; replies stream as they are generated."""
        try:
            import readline  # noqa: F401  (line editing and arrow-key history for input())
        except ImportError:
            pass
        from nima_edge.chat import Conversation
        from nima_edge.errors import NimaError
        from nima_edge.runtimes import load_runtime

        out = Console(highlight=False)
        rt = load_runtime(model, target, threads=threads, allow_custom_ops=allow_custom_ops)
        convo = Conversation(rt, system, max_new_tokens, Sampling(temperature, top_k, top_p, seed))
        out.print(f"[dim]{model} ({rt.target}, context {rt.context_length} tokens). {HELP}[/]")
        try:
            while True:
                try:
                    text = input("you> ")
                except EOFError:
                    out.print()
                    break
                command, _, arg = text.strip().partition(" ")
                if command in ("/exit", "/quit"):
                    break
                if command == "/reset":
                    convo.reset()
                    out.print("[dim]history cleared[/]")
                    continue
                if command == "/system":
                    convo.system = arg
                    out.print(f"[dim]system prompt {'set' if arg else 'cleared'}[/]")
                    continue
                if not text.strip():
                    continue
                dropped = convo.dropped
                out.print("bot> ", end="")
                try:
                    for piece in convo.reply(text):
                        out.print(piece, end="", markup=False)
                except NimaError as e:
                    out.print(f"\n[red]{e.problem}[/]")
                    continue
                except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
                    out.print(" [dim](stopped)[/]")
                    continue
                out.print()
                if convo.dropped > dropped or convo.truncated:
                    out.print(f"[dim](context full: {convo.dropped} oldest message(s) forgotten"
                              f"{', your message was cut to its end' if convo.truncated else ''})[/]")
        except KeyboardInterrupt:
            out.print()
        finally:
            rt.close()

