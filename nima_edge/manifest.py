"""The manifest beside every artifact: what it is, where it came from, and what was measured on it.

A file artifact `model.gguf` gets `model.gguf.manifest.json`; a directory artifact gets
`manifest.json` inside it. No timestamps: the same inputs give the same bytes.

The manifest is part of the artifact. A folder artifact writes it inside the folder before the
folder is swapped in (atomic_dir). A file artifact and its manifest are two files, so publish_file
replaces them in an order a kill cannot turn into a lie: the old manifest is first renamed to a
backup, then the artifact and then the new manifest are renamed into place, then the backup goes. A
kill in between leaves no manifest (read_manifest then uses the backup only while its hashes still
match the file on disk), never a new file beside an old manifest that says `verify.passed`.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from nima_edge.atomic import fsync_file, replace, sha256_file, temp_file, write_text
from nima_edge.errors import NimaError

# Recorded for every artifact; each target adds its own toolchain's distributions (nima_edge/targets.py).
CORE_TOOLS = ("nima-edge", "torch", "safetensors", "tokenizers")


def manifest_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact / "manifest.json" if artifact.is_dir() else artifact.with_name(artifact.name + ".manifest.json")


def _backup_path(artifact: Path) -> Path:
    return artifact.with_name(f".{artifact.name}.manifest.json.old")


def tool_versions(target: str | None = None) -> dict[str, str]:
    """Installed versions of the core tools and of the target's toolchain."""
    from nima_edge.targets import TARGETS
    out = {}
    for name in CORE_TOOLS + (TARGETS[target].distributions if target in TARGETS else ()):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe_files(artifact: Path, name: str | None = None) -> list[dict]:
    """Name, size and sha256 of every file of the artifact (`name`: a file artifact's final name,
    when it is still under a temporary one)."""
    artifact = Path(artifact)
    if artifact.is_dir():
        files = sorted(p for p in artifact.rglob("*") if p.is_file() and p.name != "manifest.json")
        return [{"name": str(p.relative_to(artifact)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in files]
    return [{"name": name or artifact.name, "bytes": artifact.stat().st_size, "sha256": sha256_file(artifact)}]


def build_manifest(artifact: str | Path, target: str, quant: str, source_ckpt: str | Path, name: str | None = None,
                   **extra) -> dict:
    from nima_edge.checkpoint import checkpoint_hash, read_meta  # late: checkpoint imports torch
    train_config = read_meta(source_ckpt).get("training", {}).get("train_config", {})
    return {
        "target": target,
        "quant": quant,
        "source": {"checkpoint": str(Path(source_ckpt).resolve()), "sha256": checkpoint_hash(source_ckpt)},
        # the window the model was trained on (None: not trained by nima-edge); positions past it are untrained
        "trained_context": train_config.get("context"),
        "files": describe_files(Path(artifact), name),
        "tools": tool_versions(target),
        **extra,
    }


def _dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def write_manifest(artifact: str | Path, target: str, quant: str, source_ckpt: str | Path, **extra) -> Path:
    """Write the manifest of a folder artifact (call it on the temporary folder, inside atomic_dir)."""
    artifact = Path(artifact)
    path = manifest_path(artifact)
    write_text(path, _dumps(build_manifest(artifact, target, quant, source_ckpt, **extra)))
    return path


def publish_file(tmp: Path, out: Path, target: str, quant: str, source_ckpt: str | Path, **extra) -> Path:
    """Swap a finished single-file artifact `tmp` in at `out` together with its new manifest."""
    out = Path(out)
    manifest, backup = manifest_path(out), _backup_path(out)
    text = _dumps(build_manifest(tmp, target, quant, source_ckpt, name=out.name, **extra))
    fsync_file(tmp)
    with temp_file(manifest) as tmp_manifest:
        tmp_manifest.write_text(text, encoding="utf-8")
        fsync_file(tmp_manifest)
        if manifest.exists():
            replace(manifest, backup)  # from here on no manifest vouches for the old file
        replace(tmp, out)
        replace(tmp_manifest, manifest)
    backup.unlink(missing_ok=True)
    return out


def _load(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NimaError(f"{path} is not valid JSON ({e})", "re-export the artifact: its manifest is corrupt") from e
    if not isinstance(manifest, dict) or not {"target", "quant", "source", "files"} <= set(manifest):
        raise NimaError(f"{path} is not an artifact manifest (no target/quant/source/files)",
                        "re-export the artifact with nima-edge export")
    return manifest


def read_manifest(artifact: str | Path) -> dict:
    artifact = Path(artifact)
    path = manifest_path(artifact)
    if not path.is_file():
        backup = _backup_path(artifact)
        if artifact.is_file() and backup.is_file():  # a kill inside publish_file
            manifest = _load(backup)
            if manifest["files"] == describe_files(artifact):
                return manifest  # the old file is still the one on disk: its manifest still holds
        raise NimaError(f"{artifact} has no manifest ({path.name})", "re-export it with nima-edge export")
    return _load(path)


def check_files(artifact: str | Path, manifest: dict | None = None) -> dict:
    """The manifest, after checking that the artifact's files are the ones it describes."""
    artifact = Path(artifact)
    manifest = manifest or read_manifest(artifact)
    want = {f["name"]: (f["bytes"], f["sha256"]) for f in manifest["files"]}
    have = {f["name"]: (f["bytes"], f["sha256"]) for f in describe_files(artifact)}
    if want != have:
        changed = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
        raise NimaError(f"{artifact} does not match its manifest: {', '.join(changed[:5])} "
                        f"{'differ' if len(changed) > 1 else 'differs'} from what was exported",
                        "the artifact was modified, truncated or mixed with another export; re-export it")
    return manifest


def source_checkpoint(manifest: dict, artifact: str | Path) -> Path:
    """The manifest's reference checkpoint, once checked to be the one the artifact was exported from."""
    from nima_edge.checkpoint import checkpoint_hash
    ckpt = Path(manifest["source"]["checkpoint"])
    if not (ckpt / "config.json").is_file() or not (ckpt / "model.safetensors").is_file():
        raise NimaError(f"the manifest of {artifact} names reference checkpoint {ckpt}, which is not a checkpoint "
                        "directory here", "pass --reference CKPT (the checkpoint it was exported from)")
    if checkpoint_hash(ckpt) != manifest["source"].get("sha256"):
        raise NimaError(f"the manifest of {artifact} names reference checkpoint {ckpt}, but its weights are not "
                        "the ones the artifact was exported from", "pass --reference CKPT explicitly")
    return ckpt


def update_manifest(artifact: str | Path, key: str, value) -> None:
    """Merge a measurement (e.g. `verify`, `bench`) into an existing manifest."""
    manifest = read_manifest(artifact)
    manifest[key] = value
    write_text(manifest_path(artifact), _dumps(manifest))


def is_artifact(path: str | Path) -> bool:
    """Whether `path` is an artifact nima-edge exported (it has a readable manifest)."""
    try:
        read_manifest(path)
        return True
    except NimaError:
        return False


__all__ = ["manifest_path", "tool_versions", "describe_files", "build_manifest", "write_manifest", "publish_file",
           "read_manifest", "check_files", "source_checkpoint", "update_manifest", "is_artifact"]
