import json
import subprocess
import sys

import pytest

from nima_edge.benchmarks.harness import Profile, judge, load_profile
from nima_edge.errors import NimaError

ROW_KEYS = {"artifact", "name", "target", "bytes", "threads", "load_s", "ttft_ms_median", "gen_ms_median",
            "gen_ms_p90", "gen_ms_runs", "tokens_per_s", "peak_rss_mb", "budget_ms", "within_budget"}


def write_profile(path, **overrides):
    fields = {"name": "tiny", "hardware": "test machine", "threads": 1, "runs": 2, "warmup": 1,
              "new_tokens": 5, "budget_ms": 100000.0, **overrides}
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    return path


def bench(*args):
    return subprocess.run([sys.executable, "-m", "nima_edge", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_bench_writes_json_markdown_png_and_passes_a_loose_budget(tmp_path, tiny_ckpt):
    out = bench(tiny_ckpt, "--profile", write_profile(tmp_path / "p.toml"), "--out", tmp_path / "b")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["profile"]["name"] == "tiny" and {"cpu", "cores"} <= set(report["machine"])
    (row,) = report["results"]
    assert ROW_KEYS <= set(row) and row["target"] == "torch" and len(row["gen_ms_runs"]) == 2
    assert row["gen_ms_p90"] >= row["gen_ms_median"] > row["ttft_ms_median"] > 0
    assert "| tiny-char | torch |" in (tmp_path / "b" / "bench.md").read_text()
    assert (tmp_path / "b" / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_missed_budget_sets_the_exit_code(tmp_path, tiny_ckpt):
    out = bench(tiny_ckpt, "--profile", write_profile(tmp_path / "p.toml", budget_ms=0.001), "--out", tmp_path / "b")
    assert out.returncode == 1
    assert "OVER BUDGET" in (tmp_path / "b" / "bench.md").read_text()


def test_regressions_are_flagged_against_a_baseline():
    prof = Profile(name="p", hardware="h", budget_ms=100, regression_threshold=0.1)
    rows = [{"name": "a.gguf", "target": "gguf", "gen_ms_median": 50.0},
            {"name": "b.gguf", "target": "gguf", "gen_ms_median": 50.0}]
    baseline = {"results": [{"name": "a.gguf", "target": "gguf", "gen_ms_median": 40.0},
                            {"name": "b.gguf", "target": "gguf", "gen_ms_median": 48.0}]}
    a, b = judge(rows, prof, baseline)
    assert a["regression"] and not b["regression"] and a["within_budget"]


def test_bad_profiles(tmp_path):
    with pytest.raises(NimaError, match="no benchmark profile"):
        load_profile("no-such-profile")
    with pytest.raises(NimaError, match="unknown keys"):
        load_profile(write_profile(tmp_path / "p.toml", budget=5))
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(NimaError, match="not valid TOML"):
        load_profile(tmp_path / "bad.toml")


@pytest.mark.parametrize("name", ["desktop-cpu", "desktop-nvidia", "raspberry-pi-5", "android-phone"])
def test_bundled_profiles_load(name):
    assert load_profile(name).budget_ms == 100.0


def test_a_crashing_artifact_is_reported_not_fatal(tmp_path, tiny_ckpt):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    out = bench(broken, "--profile", write_profile(tmp_path / "p.toml"), "--out", tmp_path / "b")
    assert out.returncode == 1
    (row,) = json.loads((tmp_path / "b" / "bench.json").read_text())["results"]
    assert "error" in row and not row["within_budget"]
