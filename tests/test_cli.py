import subprocess
import sys

CLI = [sys.executable, "-m", "nima_edge"]


def run(*args, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("data", "train", "eval", "generate", "export"):
        assert command in out.stdout


def test_missing_checkpoint_is_a_clear_error_not_a_traceback(tmp_path):
    out = run("eval", tmp_path / "missing", "--data", tmp_path)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "fix:" in out.stderr and "Traceback" not in out.stderr


def test_unknown_preset_is_a_clear_error(tmp_path, char_data):
    out = run("train", "--data", char_data, "--out", tmp_path / "x", "--preset", "nima-7b", "--steps", 1)
    assert out.returncode == 2 and "not a known preset" in out.stderr and "nima-1m" in out.stderr


def test_eval_and_generate_on_a_trained_checkpoint(tiny_ckpt, char_data):
    # 5 completion lines, not the default 100: BLEU/chrF are tested in test_evaluate.py (100 took ~75 s)
    out = run("eval", tiny_ckpt, "--data", char_data, "--lines", 5)
    assert out.returncode == 0, out.stderr
    assert "perplexity" in out.stdout and "bits/char" in out.stdout
    out = run("generate", tiny_ckpt, "--prompt", "ROMEO:", "--max-new-tokens", 20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ROMEO:") and len(out.stdout) > len("ROMEO:") + 5
    sampled = [run("generate", tiny_ckpt, "--prompt", "A", "--temperature", 1.0, "--top-k", 20, "--top-p", 0.9,
                   "--seed", 7).stdout for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_data_prepare_command(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40 + "Whether 'tis nobler in the mind.\n" * 40)
    out = run("data", "prepare", "--corpus", corpus, "--out", tmp_path / "d", "--tokenizer", "char",
              "--min-dedupe-chars", 1000)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d" / "train.bin").is_file() and (tmp_path / "d" / "tokenizer.json").is_file()
