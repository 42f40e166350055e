"""The chain prepare -> train -> quantize -> export -> verify -> bench, written once: `nima-edge
quickstart` and the benchmark suite (benchmarks/suite.py) both call it. What gets built comes from the
target registry (nima_edge/targets.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nima_edge import targets
from nima_edge.errors import NimaError
from nima_edge.targets import Build


def prepared_data(corpus: str, data_dir: Path, tokenizer: str = "char") -> dict:
    """Tokenized data in `data_dir`, prepared once: reused when it was made from the same corpus with
    the same tokenizer kind."""
    import json
    from nima_edge.data import prepare
    if (data_dir / "meta.json").is_file():
        meta = json.loads((data_dir / "meta.json").read_text())
        if meta.get("source") == corpus and meta.get("tokenizer") == tokenizer:
            return meta
    return prepare(corpus, data_dir, tokenizer)


def trained_checkpoint(preset: str, data_dir: Path, out: Path, minutes: float, log=print) -> tuple[Path, dict | None]:
    """`out` trained with the preset's recipe for `minutes` of wall time, or the finished checkpoint
    already there; returns the checkpoint and the training summary (None when reused)."""
    if (out / "model.safetensors").is_file():
        return out, None
    from nima_edge.train.recipe import build_config
    from nima_edge.train.trainer import train
    return out, train(data_dir, out, build_config(None, {"preset": preset, "max_seconds": minutes * 60}), log=log)


def quantized_checkpoint(ckpt: Path, weights: str, data_dir: Path | None, work: Path) -> Path:
    """The float checkpoint itself, or a GPTQ-quantized copy of it, made once and reused. The cache
    is keyed by the source's weights hash, so a retrained checkpoint of the same name is never served
    a stale quantization."""
    if weights == "float":
        return ckpt
    from nima_edge.checkpoint import checkpoint_hash
    from nima_edge.export.quantize import quantize_checkpoint
    bits, group = weights.removeprefix("int").split("-g")
    out = work / f"{ckpt.name}-{weights}-{checkpoint_hash(ckpt)[:12]}"
    if not (out / "quantization.json").is_file():
        method = "gptq" if data_dir is not None else "rtn"
        quantize_checkpoint(ckpt, out, bits=int(bits), group_size=int(group), method=method, data_dir=data_dir)
    return out


def build_all(ckpt: Path, out_dir: Path, data_dir: Path | None, plan: list[Build] | None = None, log=print,
              prefix: str = "") -> tuple[list[Path], list[str]]:
    """Export every planned artifact whose target is available, named `prefix` + target-quant;
    returns (artifacts, skipped reasons)."""
    from nima_edge.export import export
    artifacts, skipped = [], []
    out_dir.mkdir(parents=True, exist_ok=True)
    for b in targets.plan() if plan is None else plan:
        ok, why = targets.get(b.target).available()
        if not ok:
            skipped.append(f"{b.target} {b.quant}: {why}")
            continue
        src = quantized_checkpoint(ckpt, b.weights, data_dir, out_dir)
        log(f"export {b.target} {b.quant} <- {src.name}")
        try:
            artifacts.append(export(src, b.target, out_dir / (prefix + b.filename), b.quant))
        except NimaError as e:
            skipped.append(f"{b.target} {b.quant}: {e.problem}")
    return artifacts, skipped


def verify_all(artifacts: list[Path], data_dir: Path | None, log=print) -> dict[str, dict]:
    from nima_edge.verify import verify_artifact
    reports = {}
    for path in artifacts:
        log(f"verify {path.name}")
        reports[path.name] = verify_artifact(path, data_dir=data_dir)
    return reports


@dataclass
class Shipped:
    artifacts: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    verify: dict[str, dict] = field(default_factory=dict)
    bench: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.bench.get("passed")) and all(r["passed"] for r in self.verify.values())


def within_reach(ckpt: Path, plan: list[Build], profile) -> tuple[list[Build], list[str]]:
    """The builds that can meet the profile's budget on its device: one whose floor there (weight bytes
    over read bandwidth, FLOPs over GEMM rate, from the profile's published figures; benchmarks/roofline.py)
    is over the budget cannot, whatever the runtime does (nima-10m in fp32 on a Raspberry Pi 5), so it is
    not a default for that profile. A profile without device figures (desktop-cpu) keeps every build:
    bench measures those."""
    import json
    from nima_edge.benchmarks import roofline
    hardware = roofline.profile_machine(profile.device, profile.threads)
    if hardware is None:
        return list(plan), []
    config = json.loads((ckpt / "config.json").read_text())
    keep, dropped = [], []
    for b in plan:
        floor = roofline.planned_floor_ms(config, targets.precision_class(b.target, b.quant), hardware,
                                          profile.prompt_tokens, profile.new_tokens)
        if floor < profile.budget_ms:
            keep.append(b)
        else:
            dropped.append(f"{b.target} {b.quant}: its floor on {profile.name} is {floor:.0f} ms, over the "
                           f"{profile.budget_ms:g} ms budget (a lower precision of the same target meets it)")
    return keep, dropped


def ship(checkpoints: dict[str, Path], data_dir: Path | None, work: Path, profile, bench_out: Path, log=print,
         plan: list[Build] | None = None, compare_peers: bool = False) -> Shipped:
    """Quantize, export, verify and bench every checkpoint ({artifact name prefix: checkpoint})
    for every planned target available here whose precision can meet the profile's budget."""
    from nima_edge.benchmarks.harness import run_bench
    shipped = Shipped()
    for prefix, ckpt in checkpoints.items():
        todo, out_of_reach = within_reach(ckpt, targets.plan() if plan is None else plan, profile)
        built, why = build_all(ckpt, work, data_dir, todo, log=log, prefix=prefix)
        shipped.artifacts += built
        shipped.skipped += [f"{prefix}{s}" for s in out_of_reach + why]
    shipped.verify = verify_all(shipped.artifacts, data_dir, log=log)
    shipped.bench = run_bench(shipped.artifacts, profile, bench_out, compare_peers=compare_peers, progress=lambda r: log(
        f"  {r['name']}: " + (f"{r['gen_ms_median']:.1f} ms" if "gen_ms_median" in r else "error")))
    return shipped
