"""Bad input gets one clear line, a fix and exit 2: never a traceback, never silence."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from cli_checks import one_line_error
from safetensors.torch import load_file, save_file

CLI = [sys.executable, "-m", "nima_edge"]


def run(*args, timeout=300, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_in_a_well_formed_safetensors_file(cli, small_ckpt, value):
    path = small_ckpt / "model.safetensors"
    sd = load_file(str(path))
    sd["model.layers.0.mlp.up_proj.weight"][3, 5] = value
    save_file(sd, str(path), metadata={"format": "pt"})
    one_line_error(cli("generate", small_ckpt, "--max-new-tokens", 2), "NaN or Inf", "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("change,needle", [
    ({"hidden_size": "32"}, "hidden_size is '32' (str)"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers is 1.5 (float)"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0; it must be positive"),
    ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    ({"intermediate_size": -64}, "intermediate_size is -64"),
    ({"vocab_size": True}, "vocab_size is True"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"rope_scaling": {"rope_type": "no-such-scaling", "factor": 2.0}}, "rope_scaling"),
])
def test_config_json_with_wrong_types_sizes_or_rope_scaling(cli, small_ckpt, change, needle):
    cfg = json.loads((small_ckpt / "config.json").read_text())
    cfg.pop("rope_parameters", None)  # transformers 5's copy of theta/scaling would win over the edit
    (small_ckpt / "config.json").write_text(json.dumps({**cfg, **change}))
    one_line_error(cli("generate", small_ckpt, "--max-new-tokens", 2), needle)


def test_config_json_that_is_not_an_object(cli, small_ckpt):
    (small_ckpt / "config.json").write_text("[1, 2]")
    one_line_error(cli("generate", small_ckpt, "--max-new-tokens", 2), "not an object")


def test_corrupt_nima_json(cli, small_ckpt):
    (small_ckpt / "nima.json").write_text('{"preset": "nima-1m", ')
    one_line_error(cli("generate", small_ckpt, "--max-new-tokens", 2), "nima.json is not valid JSON")


def test_corrupt_manifest_json(cli, tmp_path, small_ckpt):
    pytest.importorskip("gguf")
    art = tmp_path / "m.gguf"
    assert cli("export", small_ckpt, "--target", "gguf", "--out", art)[0] == 0
    (tmp_path / "m.gguf.manifest.json").write_text('{"target": "gguf"')
    one_line_error(cli("verify", art), "manifest.json is not valid JSON")


def test_an_artifact_changed_after_export_is_refused_by_verify_and_bench(cli, tmp_path, small_ckpt):
    pytest.importorskip("gguf")
    art = tmp_path / "m.gguf"
    assert cli("export", small_ckpt, "--target", "gguf", "--out", art)[0] == 0
    data = bytearray(art.read_bytes())
    data[-1] ^= 0xFF
    art.write_bytes(bytes(data))
    one_line_error(cli("verify", art), "does not match its manifest", "m.gguf differs")
    code, stdout, stderr = cli("bench", art, "--out", tmp_path / "b")
    assert code == 1, stdout + stderr
    row, = json.loads((tmp_path / "b" / "bench.json").read_text())["results"]
    assert "does not match its manifest" in row["error"]


def test_a_manifest_pointing_at_another_checkpoint_is_refused(cli, tmp_path, small_ckpt):
    pytest.importorskip("gguf")
    art = tmp_path / "m.gguf"
    assert cli("export", small_ckpt, "--target", "gguf", "--out", art)[0] == 0
    manifest = json.loads((tmp_path / "m.gguf.manifest.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(small_ckpt, other)
    save_file({k: v + 1 for k, v in load_file(str(other / "model.safetensors")).items()},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    manifest["source"]["checkpoint"] = str(other)
    (tmp_path / "m.gguf.manifest.json").write_text(json.dumps(manifest))
    # the manifest's own hashes still match the file; its reference path names other weights
    one_line_error(cli("verify", art), "not the ones the artifact was exported from", "--reference")


# --- data ----------------------------------------------------------------------------------------

def test_a_non_utf8_corpus_names_the_byte_offset_or_takes_an_explicit_choice(cli, tmp_path, shakespeare_path):
    text = shakespeare_path.read_bytes()[:20000]
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(text[:12345] + "café".encode("latin-1") + text[12345:])
    one_line_error(cli("data", "prepare", "--corpus", corpus, "--out", tmp_path / "d"),
                   "not valid utf-8: byte 0xe9 at offset 12348", "--encoding")
    assert not (tmp_path / "d").exists()
    assert cli("data", "prepare", "--corpus", corpus, "--out", tmp_path / "d", "--encoding", "latin-1")[0] == 0
    from nima_edge.data import TokenData
    data = TokenData(tmp_path / "d")
    assert "café" in data.tokenizer.decode(data.tokens("train").tolist())
    assert cli("data", "prepare", "--corpus", corpus, "--out", tmp_path / "e", "--errors", "replace")[0] == 0
    one_line_error(cli("data", "prepare", "--corpus", corpus, "--out", tmp_path / "f", "--encoding", "klingon"),
                   "unknown --encoding")


def test_a_validation_split_shorter_than_the_context_is_refused_before_training(cli, tmp_path, shakespeare_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(shakespeare_path.read_bytes()[:30000])
    assert cli("data", "prepare", "--corpus", corpus, "--out", tmp_path / "d", "--val-fraction", "0.001")[0] == 0
    one_line_error(cli("train", "--data", tmp_path / "d", "--out", tmp_path / "run", "--preset", "nima-0.5m",
                       "--steps", 2, "--context", 64), "validation tokens, fewer than one window of 64")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_eval_quantize_and_verify_with_data_from_another_tokenizer(cli, tiny_ckpt, bpe_data, tmp_path):
    one_line_error(cli("eval", tiny_ckpt, "--data", bpe_data, "--lines", 0), "different tokenizer")
    one_line_error(cli("quantize", tiny_ckpt, "--out", tmp_path / "q", "--data", bpe_data, "--samples", 2),
                   "different tokenizer")
    assert not (tmp_path / "q").exists()
    pytest.importorskip("gguf")
    art = tmp_path / "t.gguf"
    assert cli("export", tiny_ckpt, "--target", "gguf", "--out", art)[0] == 0
    one_line_error(cli("verify", art, "--data", bpe_data), "different tokenizer")


# --- environment: missing packages, full disk, read-only folder, symlinks, a hanging artifact ----------

BLOCKED_IMPORT = textwrap.dedent("""
    import sys
    for name in sys.argv[1].split(","):
        sys.modules[name] = None  # `import name` now fails as if the package were not installed
    sys.argv = sys.argv[1:]
    {body}
""")


def _without(modules: str, body: str):
    code = BLOCKED_IMPORT.format(body=textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code, modules], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,target,what,extra", [
    ("gguf", "gguf", "exporter", "gguf"), ("llama_cpp", "gguf", "runtime", "gguf"),
    ("onnx", "onnx-portable", "exporter", "onnx"), ("onnxruntime_genai", "onnx", "runtime", "onnx"),
])
def test_a_missing_target_package_names_the_extra(module, target, what, extra):
    out = _without(module, f"""
        from nima_edge import targets
        from nima_edge.errors import NimaError
        try:
            targets.get({target!r}, {what!r}).load({what!r})
        except NimaError as e:
            print("FIX:", e.fix)
    """)
    assert f"FIX: pip install 'nima-edge[{extra}]'" in out.stdout, out.stdout + out.stderr


def test_a_missing_executorch_names_the_extra(tiny_pte):
    out = _without("executorch", f"""
        from nima_edge.errors import NimaError
        from nima_edge.runtimes import load_runtime
        try:
            load_runtime({str(tiny_pte)!r}, "executorch")
        except NimaError as e:
            print("FIX:", e.fix)
    """)
    assert "FIX: pip install 'nima-edge[executorch]'" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("module,call,extra", [
    ("matplotlib", "from nima_edge.train.tracking import plot_losses; plot_losses(Path('m.jsonl'), Path('x.png'))",
     "train"),
    ("optuna", "from nima_edge.train.tune import _optuna; _optuna()", "train"),
    ("mlflow", "from nima_edge.train.tracking import _start_mlflow; _start_mlflow(Path('.'), {}, False)", "mlflow"),
])
def test_a_missing_tool_package_names_the_extra(tmp_path, module, call, extra):
    out = _without(module, f"""
        from pathlib import Path
        from nima_edge.errors import NimaError
        try:
            {call}
        except NimaError as e:
            print("FIX:", e.fix)
    """)
    assert f"FIX: pip install 'nima-edge[{extra}]'" in out.stdout, out.stdout + out.stderr


def _in_private_mount(script: str, tmp_path):
    """Run `script` (sh) in a private mount namespace where it may mount a tmpfs (unshare -rm)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.fail("needs util-linux unshare with user namespaces to mount a small/read-only tmpfs")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


def test_disk_full_is_a_clear_error_and_the_previous_output_stays(tmp_path, shakespeare_path):
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_bytes(shakespeare_path.read_bytes()[:20000])
    shutil.copy(shakespeare_path, big)
    cli = " ".join(CLI)
    out = _in_private_mount(f"""
        mkdir -p disk && mount -t tmpfs -o size=400k tmpfs disk || exit 99
        {cli} data prepare --corpus {small} --out disk/d || exit 98
        cp disk/d/meta.json before.json
        {cli} data prepare --corpus {big} --out disk/d 2> err.txt; echo $? > rc.txt
        cmp disk/d/meta.json before.json || exit 97
        ls -a disk > ls.txt
    """, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "2" and "no space left" in err and "Traceback" not in err, err
    assert (tmp_path / "ls.txt").read_text().split() == [".", "..", "d"]  # no temp litter on the full disk


def test_a_read_only_output_folder_is_a_clear_error(tmp_path, shakespeare_path):
    cli = " ".join(CLI)
    out = _in_private_mount(f"""
        mkdir -p ro && mount -t tmpfs -o ro tmpfs ro || exit 99
        {cli} data prepare --corpus {shakespeare_path} --out ro/d 2> err.txt; echo $? > rc.txt
    """, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "2" and "cannot write" in err and "Traceback" not in err, err


def test_a_symlinked_output_folder_is_refused(cli, tmp_path, shakespeare_path):
    real = tmp_path / "real"
    assert cli("data", "prepare", "--corpus", shakespeare_path, "--out", real)[0] == 0
    (tmp_path / "link").symlink_to(real)
    one_line_error(cli("data", "prepare", "--corpus", shakespeare_path, "--out", tmp_path / "link"),
                   "symbolic link", str(real))
    assert (tmp_path / "link").is_symlink()


def test_an_artifact_that_hangs_in_bench_is_marked_timed_out_and_the_rest_still_benched(tmp_path, tiny_ckpt):
    hanging = tmp_path / "hangs.gguf"
    os.mkfifo(hanging)  # opening it for reading blocks forever: a real hang, in the child
    (tmp_path / "hangs.gguf.manifest.json").write_text(json.dumps(
        {"target": "gguf", "quant": "f32", "source": {"checkpoint": str(tiny_ckpt), "sha256": "x"},
         "files": [{"name": "hangs.gguf", "bytes": 0, "sha256": "x"}]}))
    profile = tmp_path / "p.toml"
    profile.write_text('name = "t"\nhardware = "test"\nthreads = 1\nruns = 1\nwarmup = 0\nbudget_ms = 1e9\n'
                       'timeout_s = 12\n')
    # in a child with a deadline: a hang in bench itself must fail this test, not stall the suite
    out = run("bench", hanging, tiny_ckpt, "--profile", profile, "--out", tmp_path / "b", timeout=240)
    assert out.returncode == 1, out.stdout + out.stderr
    rows = {r["name"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["results"]}
    assert rows["hangs.gguf"]["timed_out"] and "timed out after 12 s" in rows["hangs.gguf"]["error"]
    assert rows[tiny_ckpt.name]["gen_ms_median"] > 0
