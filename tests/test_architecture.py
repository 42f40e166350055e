"""The architecture's rules as tests (docs/architecture.md): the import rule between the layers, no
import cycles, runtimes that load without the export toolchain, and a registry through which a new
target is one entry plus an exporter and a runtime."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# installed package name -> source folder (pyproject's package-dir)
LAYERS = {"nima_edge": REPO / "nima_edge", "nima_edge.train": REPO / "train", "nima_edge.export": REPO / "export",
          "nima_edge.runtimes": REPO / "runtimes", "nima_edge.benchmarks": REPO / "benchmarks"}
# The core may reach these only through the registry (nima_edge/targets.py, which imports the light
# runtimes/*_format.py modules) and load_runtime; commands/ and the pipeline are the application layer.
CORE_MAY_IMPORT = {"nima_edge.targets": {"nima_edge.runtimes"}}
APPLICATION = ("nima_edge.commands", "nima_edge.pipeline", "nima_edge.cli", "nima_edge.serve", "nima_edge.outputs")


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in LAYERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if "experiments" not in rel.parts:  # research scripts are not installed
                out[".".join([pkg, *(p for p in rel.parts if p != "__init__")])] = path
    return out


def imports_of(path: Path, name: str) -> set[str]:
    """Every nima_edge module imported anywhere in the file (late imports inside functions count)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("nima_edge")}


def layer(module: str) -> str:
    for pkg in ("nima_edge.train", "nima_edge.export", "nima_edge.runtimes", "nima_edge.benchmarks"):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return "nima_edge"


def test_import_rule():
    mods = modules()
    broken = []
    for name, path in mods.items():
        src = layer(name)
        for imp in imports_of(path, name):
            dst = layer(imp)
            if src == "nima_edge.runtimes" and dst in ("nima_edge.export", "nima_edge.train", "nima_edge.benchmarks"):
                broken.append(f"{name} -> {imp} (runtimes never import export/train)")
            if src == "nima_edge" and dst != "nima_edge" and not name.startswith(APPLICATION):
                if dst not in CORE_MAY_IMPORT.get(name, set()) and not (
                        dst == "nima_edge.runtimes" and imp in ("nima_edge.runtimes", "nima_edge.runtimes.load_runtime",
                                                                "nima_edge.runtimes.detect_target")):
                    broken.append(f"{name} -> {imp} (the core reaches {dst} only through the registry)")
    assert not broken, "\n".join(broken)


def test_no_import_cycles_at_module_level():
    """Top-level imports form no cycle (late imports inside functions are how layers stay lazy)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nima_edge"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("nima_edge")}
        graph[name] = {d for d in deps if d in mods and d != name}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for d in graph.get(n, ()):
            visit(d)
        stack.pop()

    for n in graph:
        visit(n)
    assert not cycles, cycles


BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith(("torch.", "nima_edge.export", "nima_edge.train")):
                raise ImportError(f"blocked: {name}")
    sys.meta_path.insert(0, Block())
""")


@pytest.mark.parametrize("module", ["nima_edge.runtimes.gguf", "nima_edge.runtimes.onnx",
                                    "nima_edge.runtimes.onnx_portable", "nima_edge.targets"])
def test_runtime_imports_without_torch_or_export(module):
    """A device that only runs models needs none of the export toolchain (nor torch, except for the
    torch and ExecuTorch runtimes)."""
    code = BLOCKER + f"import {module}\nimport nima_edge.runtimes as r\nprint('ok')\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]


# --- a new target is one registry entry plus two small classes ----------------------------------------

DUMMY = textwrap.dedent('''
    """A test-only target: the float checkpoint copied into a folder marked dummy.json, run by torch."""
    import json
    import shutil
    from pathlib import Path

    from nima_edge.manifest import write_manifest
    from nima_edge.runtimes.torch_reference import TorchRuntime
    from nima_edge.targets import FLOAT32, Target


    def export(ckpt, out, quant, **_):
        out.mkdir(parents=True, exist_ok=True)
        for f in Path(ckpt).iterdir():
            if f.is_file() and f.name != "manifest.json":
                shutil.copy(f, out / f.name)
        (out / "dummy.json").write_text(json.dumps({"quant": quant}))
        write_manifest(out, "dummy", quant, ckpt)
        return out


    class DummyRuntime(TorchRuntime):
        target = "dummy"


    def target():
        return Target("dummy", "dummy_target:DummyRuntime", "dummy_target:export", {"f32": FLOAT32},
                      marker="dummy.json", plan=(("f32", "float"),), summary="a test-only target")
''')


@pytest.fixture(scope="module")
def dummy_env(tmp_path_factory):
    """A folder on PYTHONPATH holding the dummy target's module and an installed-distribution record
    whose entry point registers it: the way another package adds a target."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "dummy_target.py").write_text(DUMMY)
    dist = root / "dummy_target-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dummy-target\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nima_edge.targets]\ndummy = dummy_target:target\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def nima(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nima_edge", *map(str, args)], capture_output=True, text=True,
                          env={**env, "COLUMNS": "200"}, timeout=600, cwd=cwd)


def test_a_new_target_is_one_entry(dummy_env, tiny_ckpt, tmp_path):
    assert "dummy" in nima(dummy_env, "export", "--help").stdout  # the CLI's choices
    code = "from nima_edge import targets; print(json.dumps([b.filename for b in targets.plan()]))"
    p = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, env=dummy_env)
    assert "dummy-f32" in json.loads(p.stdout), p.stderr  # the pipeline's plan

    art = tmp_path / "model-dummy"
    p = nima(dummy_env, "export", tiny_ckpt, "--target", "dummy", "--quant", "f32", "--out", art)
    assert p.returncode == 0, p.stderr
    p = nima(dummy_env, "verify", art)  # recognised by its manifest, verified as a float32 class
    assert p.returncode == 0 and "pass" in p.stdout, p.stdout + p.stderr
    assert json.loads((art / "manifest.json").read_text())["verify"]["passed"]
    prof = tmp_path / "quick.toml"
    prof.write_text('name = "quick"\nhardware = "test"\nthreads = 1\ntargets = ["dummy"]\nbudget_ms = 1e9\n'
                    'prompt_tokens = 4\nnew_tokens = 4\nruns = 1\nwarmup = 0\n')
    p = nima(dummy_env, "bench", art, "--profile", prof, "--out", tmp_path / "bench")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["results"]
    assert rows[0]["target"] == "dummy" and rows[0]["gen_ms_median"] > 0


def test_registry_describes_every_target_once():
    from nima_edge import targets
    assert set(targets.names()) >= {"gguf", "onnx", "onnx-portable", "executorch", "tensorrt"}
    for t in targets.TARGETS.values():
        assert t.suffix or t.marker, f"{t.name}: its artifacts cannot be recognised"
        for quant, _ in t.plan:
            assert quant in t.schemes, f"{t.name}: planned {quant} has no precision class"
        assert t.default_quant in t.schemes


def test_cli_is_quiet(et_8da4w_cli):
    """Third-party warnings and logging stay out of a user's terminal unless --verbose: an ExecuTorch
    8da4w export, where torchao, torch's pytree and executorch's custom ops all speak, prints only ours."""
    p = et_8da4w_cli.process
    ours = ("wrote ", "exporting and lowering", "quantizing linears (8da4w)")
    noise = [line for line in (p.stdout + p.stderr).splitlines() if line.strip() and not line.startswith(ours)]
    assert not noise, noise
