"""Where a command may write. Every command that writes checks its --out here before any work starts.

An existing --out is replaced only when it is a previous output of the same kind written by
nima-edge (recognised by what nima-edge puts in it: meta.json, nima.json, a manifest, bench.json, a
recipe), or when the user passes --force. An --out equal to, inside or containing one of the
command's inputs is always refused: replacing it would destroy the input. A symbolic link as --out is
refused (the swap would replace the link, not what it points to). A training run is never restarted
over a previous run without --overwrite.
"""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Callable, Iterable

from nima_edge.errors import NimaError


def _json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def is_data_dir(path: Path) -> bool:
    meta = _json(path / "meta.json")
    return meta is not None and {"tokenizer", "vocab_size", "train", "val"} <= set(meta)


def is_checkpoint(path: Path) -> bool:
    return (path / "nima.json").is_file() and (path / "config.json").is_file()


def is_run(path: Path) -> bool:
    """A training run directory: a published checkpoint, a resumable one (before the first publish), or
    a run killed before its first checkpoint (only its recipe.toml and log)."""
    from nima_edge.train.checkpointing import last_dir  # late: imports torch
    return is_checkpoint(path) or last_dir(path) is not None or is_recipe(path / "recipe.toml")


def is_artifact(path: Path) -> bool:
    from nima_edge.manifest import is_artifact as has_manifest
    return has_manifest(path)


def is_bench_dir(path: Path) -> bool:
    return _json(path / "bench.json") is not None


def is_recipe(path: Path) -> bool:
    from nima_edge.train.recipe import FREE_SECTIONS, SECTIONS
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return bool(doc) and set(doc) <= set(SECTIONS) | set(FREE_SECTIONS)


QUICKSTART_MARKER = "quickstart.json"


def is_quickstart_dir(path: Path) -> bool:
    return _json(path / QUICKSTART_MARKER) is not None


KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "data": ("a prepared data directory", is_data_dir),
    "run": ("a training run", is_run),
    "checkpoint": ("a checkpoint", is_checkpoint),
    "artifact": ("an exported artifact", is_artifact),
    "bench": ("a bench report folder", is_bench_dir),
    "recipe": ("a recipe", is_recipe),
    "quickstart": ("a quickstart folder", is_quickstart_dir),
}


def claim_quickstart_dir(out: Path, corpus: str, preset: str, force: bool) -> None:
    """Check `quickstart --out` and mark it as a quickstart folder (reused by later quickstarts)."""
    from nima_edge.atomic import write_text
    check_out(out, "quickstart", [] if corpus == "shakespeare" else [corpus], force=force)
    if not is_quickstart_dir(out):
        write_text(out / QUICKSTART_MARKER, json.dumps({"corpus": corpus, "preset": preset}, indent=2) + "\n")


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


def check_out(out: str | Path, kind: str, inputs: Iterable[str | Path | None] = (), force: bool = False) -> Path:
    """Refuse an --out whose replacement could destroy data the user did not ask to replace."""
    out = Path(out)
    what, recognise = KINDS[kind]
    if out.is_symlink():
        raise NimaError(f"--out {out} is a symbolic link (to {os.readlink(out)}); nima-edge replaces outputs by "
                        "renaming, which would replace the link, not what it points to",
                        f"pass the real path: --out {out.resolve()}")
    real = out.resolve()
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        relation = _relation(real, Path(inp).resolve())
        if relation:
            raise NimaError(f"--out {out} {relation} the input {inp}; writing it would destroy the input",
                            "choose an --out outside the inputs")
    if out.exists() and not force and not (out.is_dir() and not any(out.iterdir())) and not recognise(out):
        raise NimaError(f"--out {out} exists and is not {what} written by nima-edge; it would be replaced",
                        "choose a new --out, or pass --force to replace it")
    _check_writable(out)
    return out


def check_run_out(out: str | Path, data: str | Path, resume: bool, overwrite: bool, force: bool) -> Path:
    """`train --out`: a previous run is continued (--resume) or replaced (--overwrite), never silently restarted."""
    out = Path(out)
    if out.is_dir() and is_run(out) and not resume and not overwrite:
        raise NimaError(f"--out {out} already holds a training run ({_run_state(out)})",
                        "continue it with --resume, choose a new --out, or pass --overwrite to start it again")
    return check_out(out, "run", [data], force=force)


def start_over(out: Path) -> None:
    """`train --overwrite`: forget the previous run's resumable state and its "finished" record, so a
    later --resume can never continue the old run; its model files are replaced at the first publish."""
    from nima_edge.atomic import discard
    from nima_edge.train.checkpointing import LAST
    for name in (LAST, f".{LAST}.old"):
        discard(out / name)
    (out / "nima.json").unlink(missing_ok=True)


def _run_state(out: Path) -> str:
    from nima_edge.train.checkpointing import last_dir
    last = last_dir(out)
    state = _json(last / "trainer_state.json") if last else None
    progress = (state or {}).get("progress") or {}
    if progress.get("finished"):
        return f"finished after {progress.get('step')} steps ({progress['finished']})"
    if progress:
        return f"stopped at step {progress.get('step')}, resumable"
    return "a published checkpoint" if is_checkpoint(out) else "started, never checkpointed"


def _check_writable(out: Path) -> None:
    """Fail before the work, not after it: outputs are renamed into place, so their folder must be writable."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise NimaError(f"cannot write {out}: {parent} is not a writable folder",
                        "choose an --out in a folder you can write to, or fix its permissions")
