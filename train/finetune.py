"""Fine-tuning on the trainer's loop: LoRA (PEFT) or full, on plain text or chat JSONL, optionally QAT.

`finetune(ckpt, data, out, cfg, ft)` runs the same loop as pretraining (train/trainer.py: schedule,
optimizer, accumulation, autocast, DDP, budgets, evaluation, early stopping, bit-exact resume) with
a `FinetuneJob`: the model starts from the checkpoint, and the data is either
- plain text (a .txt file or folder, tokenized with the checkpoint's tokenizer into OUT/data; or a
  prepared data directory made with that tokenizer): windows drawn at random, as in pretraining; or
- chat JSONL (nima_edge/chat_data.py): packed rows, loss on assistant tokens only.

LoRA goes through PEFT (`get_peft_model` on our NimaForCausalLM: its linears carry Hugging Face's
names). The run directory OUT ends as
  OUT/{config.json, model.safetensors, ...}   the merged model (LoRA folded into the weights): every
                                               command takes it
  OUT/adapter/{adapter_model.safetensors, adapter_config.json}   the adapter alone, PEFT's layout
                                               (PeftModel.from_pretrained / llama.cpp via
                                               `export --target gguf --lora OUT/adapter`)
  OUT/last/   resumable: the base weights, the adapter (or full weights), optimizer, RNG, progress
With the loop's `qat` setting (full fine-tuning only), the decoder linears train through fake
quantization (train/qat.py) for the last `qat_fraction` of the run, as in pretraining; the best model
is chosen among the fake-quantized evaluations and its nima.json names the scheme, so
`nima-edge quantize --method qat` reads off the trained codes.
With `train_quantized` (on a checkpoint carrying a quantization result, e.g. GPTQ's), the result itself
trains: its per-group scales and, unless `fixed_codes`, its codes (train/qat.py, QuantTrainedLinear),
by default towards the float model's own distribution (distill); OUT ends as a quantized checkpoint
(the float weights plus the trained result) that every exporter packs as it is.
"""
from __future__ import annotations

import copy
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nima_edge import chat_data, checkpoint
from nima_edge.atomic import sha256_file
from nima_edge.config import PRESETS
from nima_edge.errors import NimaError
from nima_edge.model import Attention, NimaForCausalLM
from nima_edge.quantization import QUANT_TENSORS, describe, load_quant, result_files
from nima_edge.train import checkpointing, qat, recipe
from nima_edge.train.recipe import TrainConfig
from nima_edge.train.trainer import Job, PretrainJob, train

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names
ADAPTER_CONFIG = "adapter_config.json"
RUN_FILE = "finetune.json"  # in OUT/last: what the run fine-tunes, so --resume needs no repeat
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fine-tuning starts from a trained model: a short warmup, a lower rate, early stopping on by default.
DEFAULTS = dict(lr=1e-3, min_lr=1e-4, warmup_steps=20, max_steps=400, batch_size=16, eval_every=50,
                eval_windows=64, patience=4, weight_decay=0.0)
# Training a quantization result: scales are ~1e-2 and each Adam step moves a parameter by about lr, so
# 1e-4 is a 1% step (docs/quantization.md has the runs behind it).
QUANT_DEFAULTS = dict(lr=1e-4, min_lr=1e-5, max_steps=300)
QUANT_STATE_FILE = "quant_state.safetensors"  # in OUT/last: the fp32 scales and latent weights being trained


@dataclass
class FinetuneConfig:
    """What is trained (LoRA or full, QAT) and how the data splits; the loop's settings are a TrainConfig."""
    full: bool = False  # full fine-tuning instead of LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LINEAR_NAMES))
    val_fraction: float = 0.1  # chat data: conversations held out for validation
    # QAT by self-distillation: the loss is the KL divergence from the starting checkpoint's next-token
    # distribution to the fake-quantized model's, instead of cross-entropy on the data, so the model
    # learns to be its float self on the grid rather than to fit the text further.
    distill: bool | None = None  # None: on when training a quantization result, else off
    # Train the checkpoint's quantization result (scales, and codes unless fixed_codes) instead of weights.
    train_quantized: bool = False
    fixed_codes: bool = False

    def validate(self) -> "FinetuneConfig":
        if self.distill is None:
            self.distill = self.train_quantized
        if self.fixed_codes and not self.train_quantized:
            raise NimaError("--fixed-codes applies to training a quantization result", "add --train-quantized")
        if self.train_quantized and self.full:
            raise NimaError("--train-quantized trains the quantization result, not every float weight",
                            "drop --full (or fine-tune the float checkpoint with --full, then quantize it)")
        if not self.full and not self.train_quantized:
            if self.lora_rank < 1:
                raise NimaError(f"LoRA rank {self.lora_rank} must be at least 1", "use e.g. --lora-rank 8")
            if self.lora_alpha <= 0:
                raise NimaError(f"LoRA alpha {self.lora_alpha} must be positive", "use e.g. --lora-alpha 16 (2 x rank)")
            if not 0 <= self.lora_dropout < 1:
                raise NimaError(f"LoRA dropout {self.lora_dropout} must be in [0, 1)", "use e.g. 0.05")
            unknown = sorted(set(self.lora_targets) - set(LINEAR_NAMES))
            if unknown or not self.lora_targets:
                raise NimaError(f"LoRA target modules {unknown or '(none)'} are not linears of the model",
                                f"choose from: {', '.join(LINEAR_NAMES)}")
        if not 0 < self.val_fraction < 1:
            raise NimaError(f"val fraction {self.val_fraction} must be between 0 and 1", "use e.g. 0.1")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def load_recipe(path: str | Path) -> tuple[dict, FinetuneConfig]:
    """A fine-tune recipe: the trainer's sections (see recipe.py) plus [finetune] with FinetuneConfig keys.
    Returns (the trainer sections, as parsed TOML, to apply once the checkpoint is known; the fine-tune settings)."""
    path = Path(path)
    if not path.is_file():
        bundled = Path(__file__).with_name("recipes") / "finetune" / f"{path.name}.toml"
        if not bundled.is_file():
            names = sorted(p.stem for p in bundled.parent.glob("*.toml"))
            raise NimaError(f"fine-tune recipe {path} does not exist",
                            f"pass a TOML file, or a bundled one: {', '.join(names)}")
        path = bundled
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise NimaError(f"recipe {path} is not valid TOML: {e}", "fix the syntax at the line named") from e
    body = doc.pop("finetune", {})
    known = {f.name for f in fields(FinetuneConfig)}
    if set(body) - known:
        moved = " (qat and qat_fraction belong in the [qat] section)" if {"qat", "qat_fraction"} & set(body) else ""
        raise NimaError(f"{path}: unknown [finetune] keys {sorted(set(body) - known)}",
                        f"keys are: {', '.join(known)}{moved}")
    return doc, FinetuneConfig(**body).validate()


def build_config(ckpt: str | Path, recipe_doc: dict | None, overrides: dict, chat: bool = False,
                 train_quantized: bool = False) -> TrainConfig:
    """The loop's settings for fine-tuning `ckpt`: DEFAULTS (and QUANT_DEFAULTS for a quantization result),
    the model's own preset and context, then the recipe's sections, then explicit overrides. The context
    defaults to the one the model was trained at for text, and to its whole context for chat (a
    conversation should fit one row)."""
    if not (Path(ckpt) / "config.json").is_file():
        raise NimaError(f"{ckpt} is not a checkpoint (no config.json)", "pass a checkpoint directory to fine-tune")
    model_cfg = json.loads((Path(ckpt) / "config.json").read_text())
    name = checkpoint.read_meta(ckpt).get("preset")
    trained = checkpoint.read_meta(ckpt).get("training", {}).get("train_config", {}).get("context")
    full = int(model_cfg.get("max_position_embeddings", 256))
    base = TrainConfig(**{**TrainConfig().to_dict(), **DEFAULTS, **(QUANT_DEFAULTS if train_quantized else {}),
                          "preset": name if name in PRESETS else recipe.FROM_CHECKPOINT,
                          "context": full if chat else min(int(trained or full), full)})
    cfg = recipe.from_dict(recipe_doc or {}, where="fine-tune recipe", base=base)
    return TrainConfig(**{**cfg.to_dict(), **overrides}).validate()


# --- data ------------------------------------------------------------------------------------------

class ChatJob(Job):
    """Chat JSONL: packed rows, loss on the assistant's tokens; batches drawn as row indices."""

    def __init__(self, path: Path, tok, val_fraction: float, seed: int):
        self.path, self.tokenizer = path, tok
        self.train_convs, self.val_convs = chat_data.split(chat_data.read_jsonl(path), val_fraction, seed)
        self.context = None

    def check(self, cfg: TrainConfig) -> None:
        if self.context != cfg.context:  # pack once per context length
            self.train_rows = chat_data.pack(self.train_convs, self.tokenizer, cfg.context)
            self.val_rows = chat_data.pack(self.val_convs, self.tokenizer, cfg.context)
            self.context = cfg.context

    def describe(self) -> str:
        cut = self.train_rows.truncated + self.val_rows.truncated
        return (f"{len(self.train_convs):,} train / {len(self.val_convs):,} val conversations in "
                f"{len(self.train_rows):,} packed rows ({self.train_rows.label_tokens:,} assistant tokens)"
                + (f", {cut} cut to the context" if cut else ""))

    def draw(self, cfg: TrainConfig, step: int) -> np.ndarray:
        return np.random.default_rng([cfg.seed, step]).integers(0, len(self.train_rows), cfg.batch_size)

    def rows(self, cfg: TrainConfig, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.asarray(items, dtype=np.int64))
        return self.train_rows.inputs[idx], self.train_rows.labels[idx]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, cfg: TrainConfig, batch_size: int = 16) -> dict:
        """Mean loss per assistant token over every validation row."""
        return evaluate_rows(model, self.val_rows, batch_size)


@torch.no_grad()
def evaluate_rows(model: torch.nn.Module, rows: chat_data.Rows, batch_size: int = 16) -> dict:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = rows.inputs[i:i + batch_size].to(device), rows.labels[i:i + batch_size].to(device)
        n = int((y != chat_data.IGNORE).sum())
        if n:
            _, loss = model(x, y)
            total, count = total + loss.item() * n, count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
            "bits_per_char": loss / math.log(2) * count / max(rows.chars, 1)}


def text_job(data: Path, tok, out: Path) -> PretrainJob:
    """Plain text: a prepared data directory made with the checkpoint's tokenizer, or a .txt file /
    folder tokenized with it into OUT/data (the same split as `nima-edge data prepare`)."""
    from nima_edge.data import prepare
    if (data / "meta.json").is_file():
        job = PretrainJob(data)
        job.data.check_tokenizer(tok, "the checkpoint")
        return job
    prepare(str(data), out / "data", tokenizer=tok)
    return PretrainJob(out / "data")


# --- the job ---------------------------------------------------------------------------------------

class FinetuneJob(Job):
    """The checkpoint's model (with LoRA, or all weights trainable), fed by a text or chat data job."""

    def __init__(self, ckpt: Path, data: Path, out: Path, ft: FinetuneConfig, seed: int):
        self.ckpt, self.ft = ckpt, ft
        self.base, tok = checkpoint.load(ckpt)  # float weights (a quantization result is not fine-tuned)
        self.tokenizer = tok
        self.result = load_quant(ckpt) if ft.train_quantized else None
        if ft.train_quantized and self.result is None:
            raise NimaError(f"{ckpt} carries no quantization result to train",
                            f"quantize it first (nima-edge quantize {ckpt} --out Q), then fine-tune Q "
                            "--train-quantized")
        self.source: Job = (ChatJob(data, tok, ft.val_fraction, seed) if chat_data.is_chat_file(data)
                            else text_job(data, tok, out))
        self.kind = "chat" if isinstance(self.source, ChatJob) else "text"
        self.info = {"source": str(ckpt.resolve()), "source_sha256": checkpoint.checkpoint_hash(ckpt),
                     "data": str(data.resolve()), "data_kind": self.kind, **ft.to_dict()}
        if ft.train_quantized:  # the codes and scales training starts from (a resume checks them)
            self.info["result_sha256"] = sha256_file(ckpt / QUANT_TENSORS)

    # data: the source's
    def check(self, cfg: TrainConfig) -> None:
        if cfg.short_context:  # packed conversations are cut at one context; a second packing is not built
            raise NimaError("short_context applies to pretraining, not to fine-tuning",
                            "set short_context = 0 in the fine-tune recipe")
        if self.ft.train_quantized and cfg.qat:
            raise NimaError("--train-quantized trains the checkpoint's quantization result, --qat float weights "
                            "through the grid of --qat: they do not combine", "drop one of them")
        if self.ft.distill and not (cfg.qat or self.ft.train_quantized):
            raise NimaError("--distill trains the model towards its own starting distribution, which changes "
                            "nothing without fake quantization", "add --qat (e.g. --qat int4-g32 --full)")
        if cfg.qat and not self.ft.full:
            raise NimaError("QAT trains the weights that get quantized, but LoRA keeps them frozen",
                            "add --full to fine-tune every weight with --qat")
        if cfg.context > self.base.config.max_position_embeddings:
            raise NimaError(f"context {cfg.context} exceeds the model's {self.base.config.max_position_embeddings}",
                            f"use --context {self.base.config.max_position_embeddings} or less")
        self.source.check(cfg)

    def describe(self) -> str:
        how = ("full fine-tuning" if self.ft.full else
               f"its {describe(self.result)} result ({'scales' if self.ft.fixed_codes else 'scales and codes'})"
               if self.ft.train_quantized else
               f"LoRA r={self.ft.lora_rank} alpha={self.ft.lora_alpha:g}")
        if self.ft.distill:
            how += ", towards its float model (KL)"
        return f"{how}, {self.source.describe()}"

    def draw(self, cfg, step):
        return self.source.draw(cfg, step)

    def rows(self, cfg, items):
        return self.source.rows(cfg, items)

    def evaluate(self, model, cfg):
        return self.source.evaluate(model, cfg)

    # the model
    def build_model(self, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
        model = copy.deepcopy(self.base)
        set_dropout(model, cfg.dropout)
        if self.ft.distill:  # the teacher: the checkpoint as it was, frozen
            self.teacher = copy.deepcopy(self.base).to(device).eval().requires_grad_(False)
        if self.ft.train_quantized:
            qat.attach_result(model, self.result, codes=not self.ft.fixed_codes)
        elif not self.ft.full:
            model = add_lora(model, self.ft)
        return model.to(device).train()

    def loss(self, net, x, y):
        if not self.ft.distill:
            return super().loss(net, x, y)
        keep = y != -100  # chat rows: only the assistant's tokens, as for cross-entropy
        with torch.no_grad():
            target = self.teacher(x).float().log_softmax(-1)[keep]
        return F.kl_div(net(x).float().log_softmax(-1)[keep], target, log_target=True, reduction="batchmean")

    def restore(self, model, last: Path, device: torch.device) -> None:
        if self.ft.full:
            return super().restore(model, last, device)
        weights, _ = checkpoint.load(last)
        base = self.base.state_dict()
        if any(not torch.equal(t, base[k]) for k, t in weights.state_dict().items()):
            raise NimaError(f"the base checkpoint {self.ckpt} changed since this fine-tune started",
                            "resume with the checkpoint the run started from, or start a new run")
        if self.ft.train_quantized:
            started = json.loads((last / RUN_FILE).read_text()).get("result_sha256")  # absent in older runs
            if started and started != self.info["result_sha256"]:
                raise NimaError(f"the quantization result in {self.ckpt} changed since this fine-tune started",
                                "resume with the result the run started from, or start a new run")
            return qat.load_trained_state(model, load_safetensors((last / QUANT_STATE_FILE).read_bytes()))
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_safetensors((last / ADAPTER_WEIGHTS).read_bytes()))

    def resumable(self, model) -> tuple[NimaForCausalLM, dict[str, bytes]]:
        files = {RUN_FILE: (json.dumps(self.info, indent=1) + "\n").encode()}
        if self.ft.full:
            return model, files
        if self.ft.train_quantized:
            return self.base, {**files, QUANT_STATE_FILE: save_safetensors(qat.trained_state(model))}
        return self.base, {**files, ADAPTER_WEIGHTS: adapter_files(model, self.ckpt)[ADAPTER_WEIGHTS]}

    def publishable(self, model) -> tuple[NimaForCausalLM, dict[str, bytes], dict]:
        meta = {"finetune": self.info}
        if self.ft.full:
            return model, {}, meta
        if self.ft.train_quantized:  # OUT is a quantized checkpoint: the float weights and the trained result
            # what quantize recorded (source, calibration, ...), less what the layers now say themselves
            kept = {k: v for k, v in checkpoint.read_meta(self.ckpt)["quantization"].items()
                    if k not in ("format", "version", "bits", "symmetric", "method")}
            files, summary = result_files(qat.trained_result(model), {**kept, "trained_from": str(self.ckpt)})
            return self.base, files, {**meta, "quantization": summary}
        files = {f"{ADAPTER_DIR}/{k}": v for k, v in adapter_files(model, self.ckpt).items()}
        return merged(model), files, meta


def set_dropout(model: NimaForCausalLM, p: float) -> None:
    """Fine-tuning's own dropout (the checkpoint's was set when it was built)."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, Attention):
            m.dropout = p
        elif isinstance(m, torch.nn.Dropout):
            m.p = p


# --- LoRA through PEFT -----------------------------------------------------------------------------

def add_lora(model: NimaForCausalLM, ft: FinetuneConfig):
    """A PeftModel: LoRA on the chosen linears, everything else frozen."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                        target_modules=sorted(ft.lora_targets), bias="none")
    return get_peft_model(model, config)


def adapter_files(peft_model, base: Path) -> dict[str, bytes]:
    """The adapter in PEFT's layout (what PeftModel.save_pretrained writes), as bytes: deterministic."""
    from peft import get_peft_model_state_dict
    sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    config = peft_model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["base_model_name_or_path"] = str(Path(base).resolve())
    return {ADAPTER_WEIGHTS: save_safetensors(sd, metadata={"format": "pt"}),
            ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode()}


def merged(peft_model) -> NimaForCausalLM:
    """A copy of the model with every LoRA update folded into its base weight (training continues on the original)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def load_adapter(ckpt: str | Path, adapter: str | Path):
    """The base checkpoint with a PEFT adapter directory applied (unmerged), for checks and tools."""
    from peft import PeftModel
    model, tok = checkpoint.load(ckpt)
    return PeftModel.from_pretrained(model, str(adapter)).eval(), tok


# --- entry point -----------------------------------------------------------------------------------

def finetune(ckpt: str | Path, data: str | Path | None, out: str | Path, cfg: TrainConfig | None = None,
             ft: FinetuneConfig | None = None, resume: bool = False, overrides: dict | None = None, log=print,
             progress_bar: bool = True, on_eval=None) -> dict:
    """Fine-tune `ckpt` on `data` into `out` (see the module doc); `resume` continues the run in `out`
    with its own checkpoint, data and fine-tune settings (only budget-like settings may change)."""
    out = Path(out)
    if resume:
        last = checkpointing.last_dir(out)
        if last is None or not (last / RUN_FILE).is_file():
            raise NimaError(f"--resume: {out} holds no resumable fine-tune", "drop --resume to start a new run")
        info = json.loads((last / RUN_FILE).read_text())
        if info.get("qat"):  # written before QAT became a loop setting: resuming would drop it silently
            raise NimaError(f"{out} is a QAT fine-tune started by an older nima-edge, which this one cannot resume",
                            "start it again (same command, without --resume)")
        ckpt, data = Path(info["source"]), Path(info["data"])
        ft = FinetuneConfig(**{f.name: info[f.name] for f in fields(FinetuneConfig) if f.name in info})
        seed = TrainConfig(**checkpointing.read_state(last)["config"]).seed
    else:
        if data is None:
            raise NimaError("no fine-tuning data given", "pass --data (a chat .jsonl file, a .txt file or a folder)")
        ckpt, data = Path(ckpt), Path(data)
        if not data.exists():
            raise NimaError(f"fine-tuning data {data} does not exist",
                            "pass a chat .jsonl file, a .txt file, a folder of .txt files or a prepared data directory")
        ft = (ft or FinetuneConfig()).validate()
        cfg = cfg or build_config(ckpt, None, {}, chat=chat_data.is_chat_file(data))
        seed = cfg.seed
    job = FinetuneJob(ckpt, data, out, ft, seed)
    return train(None, out, cfg, log=log, resume=resume, overrides=overrides, progress_bar=progress_bar,
                 on_eval=on_eval, job=job)
