"""Training settings (`TrainConfig`) and recipes: TOML files that set them, validated with clear errors.

A recipe groups the settings into sections; every key is a `TrainConfig` field:

    [model]     preset, dropout, context, short_context, short_fraction
    [optimizer] optimizer, lr, min_lr, beta1, beta2, weight_decay, grad_clip
    [schedule]  schedule, warmup_steps, restart_steps, restart_mult, schedule_clock
    [batch]     batch_size, grad_accum
    [run]       max_steps, max_seconds, precision, device, seed
    [eval]      eval_every, eval_windows, patience, min_delta, checkpoint_every
    [tracking]  log_every, mlflow
    [qat]       qat, qat_fraction
    [measured]  free-form: the figures this recipe reached (documentation, not settings)
"""
from __future__ import annotations

import tomllib
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tomli_w

from nima_edge.config import PRESETS
from nima_edge.errors import NimaError

OPTIMIZERS = ("adamw", "lion")
SCHEDULES = ("cosine", "cosine_restarts", "constant")
CLOCKS = ("steps", "time")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
FROM_CHECKPOINT = "checkpoint"  # fine-tuning a model of no preset (e.g. an import): its own config.json rules


def short_windows_fit(short_context: int, context: int) -> bool:
    """Short windows must be shorter than the context and divide it (a step keeps its token count)."""
    return 1 <= short_context < context and context % short_context == 0


@dataclass
class TrainConfig:
    preset: str = "nima-1m"
    dropout: float = 0.0
    context: int = 128
    # Short-then-long windows: for the first short_fraction of the run (by the schedule's clock), train
    # windows of short_context tokens, context / short_context times as many per step (the same tokens per
    # step), then every position of `context`. Short windows are cheaper per token (attention) and give
    # more, less correlated rows early on; the last part trains the positions the model is used at.
    short_context: int = 0  # 0 = always `context`
    short_fraction: float = 0.0
    optimizer: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    schedule: str = "cosine"
    warmup_steps: int = 100
    restart_steps: int = 500  # cosine_restarts: length of the first cycle after warmup
    restart_mult: float = 2.0  # cosine_restarts: each cycle is this many times longer than the last
    schedule_clock: str = "steps"  # "time": decay over max_seconds of training instead of max_steps
    batch_size: int = 16  # global windows per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    max_steps: int = 2000
    max_seconds: float | None = None  # wall-clock budget (total over resumes); stops at whichever limit comes first
    precision: str = "auto"  # auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU
    device: str = "auto"
    seed: int = 1337
    eval_every: int = 250
    eval_windows: int = 64
    patience: int = 0  # early stopping: evaluations without improvement before stopping; 0 = off
    min_delta: float = 0.0  # an evaluation improves only if val loss drops by more than this
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0 = at every evaluation
    log_every: int = 10
    mlflow: bool = False
    # Quantization-aware training (train/qat.py): e.g. "int4-g32" or "8da4w" fake-quantizes the decoder
    # linears for the last qat_fraction of the run (pretraining or fine-tuning alike), on the grid of
    # `nima-edge quantize`; the best model is chosen among the fake-quantized evaluations.
    qat: str | None = None
    qat_fraction: float = 0.5

    def validate(self) -> "TrainConfig":
        def bad(name: str, why: str, fix: str):
            raise NimaError(f"training setting {name} = {getattr(self, name)!r} {why}", fix)

        if self.preset not in PRESETS and self.preset != FROM_CHECKPOINT:
            bad("preset", "is not a known preset", f"choose one of: {', '.join(PRESETS)}")
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("schedule_clock", CLOCKS),
                              ("precision", PRECISIONS), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                bad(name, "is not one of the choices", f"use one of: {', '.join(choices)}")
        for name in ("context", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_windows", "log_every"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1", f"set {name} to a positive integer")
        for name in ("warmup_steps", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                bad(name, "must not be negative", f"set {name} to 0 or more")
        if not 0 < self.lr <= 1:
            bad("lr", "is outside (0, 1]", "tiny models train well at 1e-3 to 1e-2")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", f"must be between 0 and lr ({self.lr})", "e.g. min_lr = lr / 10")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)", "typical: beta1 = 0.9, beta2 = 0.95 (AdamW) or 0.99 (Lion)")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)", "use 0.0 for short runs, 0.1-0.2 against overfitting")
        for name in ("weight_decay", "grad_clip", "min_delta"):
            if getattr(self, name) < 0:
                bad(name, "must not be negative", f"set {name} to 0 or more")
        if self.restart_steps < 1 or self.restart_mult < 1:
            bad("restart_steps" if self.restart_steps < 1 else "restart_mult", "is too small",
                "restart_steps >= 1 and restart_mult >= 1")
        if self.max_seconds is not None and self.max_seconds <= 0:
            bad("max_seconds", "must be positive", "leave it out for no wall-clock budget")
        if self.schedule_clock == "time" and self.max_seconds is None:
            bad("schedule_clock", "needs a wall-clock budget", "set max_seconds, or use schedule_clock = \"steps\"")
        if self.schedule_clock == "time" and self.schedule != "cosine":
            bad("schedule_clock", f"applies only to schedule = \"cosine\", not {self.schedule!r}",
                "use schedule_clock = \"steps\" with this schedule")
        if self.short_context:
            if not short_windows_fit(self.short_context, self.context):
                bad("short_context", f"must divide context ({self.context}) and be shorter",
                    f"e.g. short_context = {max(self.context // 4, 1)}, or 0 for none")
            if not 0 < self.short_fraction < 1:
                bad("short_fraction", "must be in (0, 1) with a short_context", "e.g. short_fraction = 0.7")
        elif self.short_fraction:
            bad("short_fraction", "needs a short_context", "set short_context too, or short_fraction = 0")
        if self.qat is not None:
            from nima_edge.train.qat import parse  # the scheme names live with the fake quantization
            parse(self.qat)
            if not 0 < self.qat_fraction <= 1:
                bad("qat_fraction", "must be in (0, 1]", "e.g. 0.5: the last half of the run")
        max_ctx = PRESETS.get(self.preset, {}).get("max_position_embeddings", self.context)
        if self.context > max_ctx:
            bad("context", f"exceeds the {self.preset} context of {max_ctx}", f"use context <= {max_ctx}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("preset", "dropout", "context", "short_context", "short_fraction"),
    "optimizer": ("optimizer", "lr", "min_lr", "beta1", "beta2", "weight_decay", "grad_clip"),
    "schedule": ("schedule", "warmup_steps", "restart_steps", "restart_mult", "schedule_clock"),
    "batch": ("batch_size", "grad_accum"),
    "run": ("max_steps", "max_seconds", "precision", "device", "seed"),
    "eval": ("eval_every", "eval_windows", "patience", "min_delta", "checkpoint_every"),
    "tracking": ("log_every", "mlflow"),
    "qat": ("qat", "qat_fraction"),
}
FREE_SECTIONS = ("measured",)
_TYPES = typing.get_type_hints(TrainConfig)
assert sorted(sum(SECTIONS.values(), ())) == sorted(f.name for f in fields(TrainConfig)), "every field in one section"


def _check_type(where: str, name: str, value):
    want = _TYPES[name]
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          float | None: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          str | None: lambda v: isinstance(v, str)}[want]  # TOML has no null: an absent key is None
    if not ok(value):
        kind = getattr(want, "__name__", "string" if want == str | None else "number")
        raise NimaError(f"{where}: {name} = {value!r} should be a {kind}", f"write {name} as a TOML {kind}")
    return float(value) if want in (float, float | None) else value


def from_dict(d: dict, where: str = "recipe", base: TrainConfig | None = None) -> TrainConfig:
    """Settings from a sectioned dict (parsed TOML) on top of `base`; unknown sections or keys are errors."""
    values = (base or TrainConfig()).to_dict()
    for section, body in d.items():
        if section in FREE_SECTIONS:
            continue
        if section not in SECTIONS:
            raise NimaError(f"{where}: unknown section [{section}]",
                            f"sections are: {', '.join(f'[{s}]' for s in (*SECTIONS, *FREE_SECTIONS))}")
        if not isinstance(body, dict):
            raise NimaError(f"{where}: {section} must be a [section] table, not a value",
                            f"write [{section}] above its keys")
        for key, value in body.items():
            if key not in SECTIONS[section]:
                home = next((s for s, keys in SECTIONS.items() if key in keys), None)
                fix = (f"{key} belongs in [{home}]" if home else
                       f"keys of [{section}] are: {', '.join(SECTIONS[section])}")
                raise NimaError(f"{where}: unknown key {key!r} in [{section}]", fix)
            values[key] = _check_type(where, key, value)
    return TrainConfig(**values).validate()


def load(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        bundled = Path(__file__).with_name("recipes") / f"{path.name}.toml"
        if bundled.is_file():  # a bare preset name picks the bundled recipe
            path = bundled
        else:
            raise NimaError(f"recipe {path} does not exist",
                            f"pass a TOML file, or one of the bundled recipes: {', '.join(bundled_recipes())}")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise NimaError(f"recipe {path} is not valid TOML: {e}", "fix the syntax at the line named") from e
    return from_dict(d, where=str(path), base=base)


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in Path(__file__).with_name("recipes").glob("*.toml"))


def measured(path: str | Path) -> dict:
    """The [measured] section of a recipe (empty when absent)."""
    return tomllib.loads(Path(path).read_text(encoding="utf-8")).get("measured", {})


def dumps(cfg: TrainConfig, measured: dict | None = None, header: str = "") -> str:
    d = cfg.to_dict()
    doc = {s: {k: d[k] for k in keys if d[k] is not None} for s, keys in SECTIONS.items()}
    if measured:
        doc["measured"] = measured
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + tomli_w.dumps(doc)


def build_config(recipe: str | Path | None, overrides: dict) -> TrainConfig:
    """A recipe (default: the bundled one of the chosen preset, if any) with explicit settings on top."""
    if recipe is None:
        name = overrides.get("preset", TrainConfig.preset)
        recipe = name if name in bundled_recipes() else None
    cfg = load(recipe) if recipe is not None else TrainConfig()
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise NimaError(f"unknown training settings: {', '.join(sorted(unknown))}",
                        f"settings are: {', '.join(f.name for f in fields(TrainConfig))}")
    settings = {**cfg.to_dict(), **overrides}
    if "context" in overrides and "short_context" not in overrides and settings["short_context"] and \
            not short_windows_fit(settings["short_context"], settings["context"]):
        settings.update(short_context=0, short_fraction=0.0)  # --context 64 on a short-window recipe: plain 64
    return TrainConfig(**settings).validate()
