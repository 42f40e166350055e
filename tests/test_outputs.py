"""Outputs never destroy user data: --out checks, atomic swaps and their recovery, manifests as part of
the artifact. The kill tests (a real SIGKILL at random moments) are in test_kill.py."""
import json
import os
import shutil

import pytest
from cli_checks import one_line_error

from nima_edge.atomic import atomic_dir, write_text
from nima_edge.errors import NimaError
from nima_edge.manifest import check_files, manifest_path, publish_file, read_manifest, write_manifest
from nima_edge.outputs import check_out, check_run_out


@pytest.fixture
def user_folder(tmp_path):
    d = tmp_path / "my-thesis"
    d.mkdir()
    (d / "chapter1.tex").write_text("months of work")
    return d


# --- check_out -----------------------------------------------------------------------------------

def test_a_new_or_empty_out_is_fine(tmp_path):
    assert check_out(tmp_path / "new" / "deeper", "data") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "artifact")


@pytest.mark.parametrize("kind", ["data", "run", "checkpoint", "artifact", "bench", "recipe", "quickstart"])
def test_a_foreign_folder_is_refused_unless_forced(user_folder, kind):
    with pytest.raises(NimaError, match="exists and is not an? .* written by nima-edge") as e:
        check_out(user_folder, kind)
    assert "--force" in e.value.fix
    check_out(user_folder, kind, force=True)
    assert (user_folder / "chapter1.tex").read_text() == "months of work"


def test_a_foreign_file_is_refused(tmp_path):
    f = tmp_path / "notes.gguf"
    f.write_text("not ours")
    with pytest.raises(NimaError, match="not an exported artifact"):
        check_out(f, "artifact")


def test_previous_outputs_of_the_same_kind_are_recognised(tmp_path, small_ckpt):
    check_out(small_ckpt, "checkpoint")
    check_out(small_ckpt, "run")
    with pytest.raises(NimaError):
        check_out(small_ckpt, "data")  # a checkpoint is not prepared data
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench.json").write_text("{}")
    check_out(bench, "bench")
    recipe = tmp_path / "tuned.toml"
    recipe.write_text('[optimizer]\nlr = 0.001\n')
    check_out(recipe, "recipe")
    recipe.write_text("[tool.black]\nline-length = 88\n")  # a TOML of someone else's
    with pytest.raises(NimaError):
        check_out(recipe, "recipe")


@pytest.mark.parametrize("where,relation", [(".", "is the input"), ("sub/out", "is inside the input"),
                                            ("..", "contains the input")])
def test_out_equal_to_inside_or_containing_the_input_is_refused_even_with_force(tmp_path, small_ckpt, where,
                                                                                relation):
    with pytest.raises(NimaError, match=relation):
        check_out(small_ckpt / where, "checkpoint", [small_ckpt], force=True)


def test_a_symlinked_out_is_refused(tmp_path, small_ckpt):
    link = tmp_path / "link"
    link.symlink_to(small_ckpt)
    with pytest.raises(NimaError, match="symbolic link") as e:
        check_out(link, "checkpoint")
    assert str(small_ckpt) in e.value.fix


def test_train_over_a_previous_run_needs_resume_or_overwrite(tmp_path, small_ckpt):
    with pytest.raises(NimaError, match="already holds a training run") as e:
        check_run_out(small_ckpt, tmp_path / "data", resume=False, overwrite=False, force=False)
    assert "--resume" in e.value.fix and "--overwrite" in e.value.fix
    check_run_out(small_ckpt, tmp_path / "data", resume=True, overwrite=False, force=False)
    check_run_out(small_ckpt, tmp_path / "data", resume=False, overwrite=True, force=False)


# --- the CLI refuses before any work -------------------------------------------------------------

def test_cli_data_prepare_refuses_a_foreign_out_and_an_out_inside_the_corpus(cli, tmp_path, user_folder,
                                                                             shakespeare_path):
    run = cli
    one_line_error(run("data", "prepare", "--corpus", shakespeare_path, "--out", user_folder), "--force")
    assert (user_folder / "chapter1.tex").read_text() == "months of work"
    corpus = tmp_path / "texts"
    corpus.mkdir()
    shutil.copy(shakespeare_path, corpus / "plays.txt")
    one_line_error(run("data", "prepare", "--corpus", corpus, "--out", corpus / "prepared"), "is inside the input")
    one_line_error(run("data", "prepare", "--corpus", corpus, "--out", tmp_path), "contains the input")


def test_cli_export_quantize_and_train_refuse_outs_that_would_destroy_data(cli, tmp_path, small_ckpt, user_folder):
    run = cli
    one_line_error(run("export", small_ckpt, "--target", "gguf", "--out", small_ckpt / "model.gguf"),
                   "is inside the input")
    one_line_error(run("export", small_ckpt, "--target", "onnx-portable", "--out", user_folder), "--force")
    one_line_error(run("quantize", small_ckpt, "--method", "rtn", "--out", small_ckpt), "is the input")
    one_line_error(run("quantize", small_ckpt, "--method", "rtn", "--out", user_folder), "--force")
    one_line_error(run("train", "--data", tmp_path / "d", "--out", small_ckpt, "--steps", 1),
                   "already holds a training run", "--overwrite")
    one_line_error(run("train", "--data", tmp_path / "d", "--out", user_folder, "--steps", 1), "--force")
    one_line_error(run("bench", small_ckpt, "--out", user_folder), "--force")
    one_line_error(run("tune", "--data", tmp_path / "d", "--out", user_folder / "chapter1.tex"), "--force")
    # tune keeps its best model beside the recipe (x.toml -> x/): never over a run tune did not write
    one_line_error(run("tune", "--data", tmp_path / "d", "--out", small_ckpt.with_name(small_ckpt.name + ".toml")),
                   "tune did not write", "--force")
    assert not small_ckpt.with_name(small_ckpt.name + ".toml").exists() and (small_ckpt / "nima.json").is_file()
    one_line_error(run("quickstart", "--out", user_folder), "--force")
    assert (user_folder / "chapter1.tex").read_text() == "months of work"
    assert sorted(p.name for p in user_folder.iterdir()) == ["chapter1.tex"]


# --- atomic swaps and their recovery -------------------------------------------------------------

def test_a_kill_between_the_swaps_renames_leaves_the_old_copy_which_the_next_write_restores(tmp_path):
    target = tmp_path / "last"
    with atomic_dir(target) as tmp:
        (tmp / "state").write_text("old")
    # the state a SIGKILL between atomic_dir's two renames leaves: the old copy aside, a temp folder
    os.replace(target, tmp_path / ".last.old")
    (tmp_path / ".last.nima-abcdefgh.tmp").mkdir()
    (tmp_path / ".last.nima-abcdefgh.tmp" / "state").write_text("half new")
    from nima_edge.train.checkpointing import last_dir
    (tmp_path / ".last.old" / "trainer_state.json").write_text("{}")
    assert last_dir(tmp_path) == tmp_path / ".last.old"  # resume reads the complete old copy
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:  # the next write: old copy back first, temp litter removed
            assert (target / "state").read_text() == "old"
            raise RuntimeError("killed again")
    assert (target / "state").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_leftover_temp_files_of_a_killed_write_are_cleaned(tmp_path):
    (tmp_path / ".m.gguf.nima-12345678.tmp").write_bytes(b"half")
    (tmp_path / ".m.gguf.nima-abcdefgh.tmp").mkdir()
    (tmp_path / ".other.nima-12345678.tmp").write_bytes(b"another target's: kept")
    write_text(tmp_path / "m.gguf", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.nima-12345678.tmp", "m.gguf"]


# --- the manifest is part of the artifact --------------------------------------------------------

def _publish(tmp_path, small_ckpt, out, content: bytes):
    tmp = tmp_path / f".{out.name}.nima-xxxxxxxx.tmp"
    tmp.write_bytes(content)
    return publish_file(tmp, out, "gguf", "f32", small_ckpt, note=content.decode())


def test_single_file_artifact_and_manifest_are_replaced_together(tmp_path, small_ckpt):
    out = tmp_path / "m.gguf"
    _publish(tmp_path, small_ckpt, out, b"old")
    assert check_files(out)["note"] == "old"
    _publish(tmp_path, small_ckpt, out, b"new")
    assert check_files(out)["note"] == "new" and out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf", "m.gguf.manifest.json"]


def test_a_kill_inside_publish_never_leaves_a_new_file_beside_an_old_manifest(tmp_path, small_ckpt):
    out = tmp_path / "m.gguf"
    _publish(tmp_path, small_ckpt, out, b"old")
    old_manifest = json.loads(manifest_path(out).read_text())
    old_manifest["verify"] = {"passed": True}
    write_text(manifest_path(out), json.dumps(old_manifest))
    backup = tmp_path / ".m.gguf.manifest.json.old"
    # killed after the old manifest moved aside, before the new file: the old pair still holds
    os.replace(manifest_path(out), backup)
    assert read_manifest(out)["verify"]["passed"] is True
    # killed after the new file went in, before its manifest: no manifest vouches for it
    out.write_bytes(b"new")
    with pytest.raises(NimaError, match="has no manifest"):
        read_manifest(out)
    _publish(tmp_path, small_ckpt, out, b"newer")  # the next export repairs it
    assert check_files(out)["note"] == "newer" and not backup.exists()


def test_folder_manifest_is_written_inside_the_swap(tmp_path, small_ckpt):
    out = tmp_path / "art"
    with atomic_dir(out) as tmp:
        (tmp / "model.bin").write_bytes(b"weights")
        write_manifest(tmp, "executorch", "fp32", small_ckpt)
    assert check_files(out)["files"] == [{"name": "model.bin", "bytes": 7, "sha256": check_files(out)["files"][0]["sha256"]}]
    (out / "model.bin").write_bytes(b"tampered")
    with pytest.raises(NimaError, match="does not match its manifest: model.bin differs"):
        check_files(out)


def test_a_corrupt_manifest_is_a_clear_error(tmp_path, small_ckpt):
    out = tmp_path / "m.gguf"
    _publish(tmp_path, small_ckpt, out, b"x")
    manifest_path(out).write_text('{"target": "gguf", ')
    with pytest.raises(NimaError, match="not valid JSON"):
        read_manifest(out)
    manifest_path(out).write_text('["a list"]')
    with pytest.raises(NimaError, match="not an artifact manifest"):
        read_manifest(out)


def test_overwrite_forgets_the_previous_runs_resumable_state(small_ckpt):
    from nima_edge.outputs import start_over
    from nima_edge.train.checkpointing import last_dir
    with atomic_dir(small_ckpt / "last") as tmp:
        (tmp / "trainer_state.json").write_text('{"progress": {"step": 240, "finished": "max_steps"}}')
    assert last_dir(small_ckpt) is not None
    start_over(small_ckpt)
    assert last_dir(small_ckpt) is None and not (small_ckpt / "nima.json").exists()
    assert sorted(p.name for p in small_ckpt.iterdir() if p.name.startswith(".")) == []
