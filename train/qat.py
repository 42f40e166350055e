"""Quantization-aware training: straight-through fake quantization of the decoder linears.

Schemes (`--qat`):
- `int4-g32` (also g64 / g128, and `int8-gN`): each decoder linear's forward uses its weight rounded
  onto EXACTLY the grid of `nima-edge quantize` (nima_edge.quantization.grid and quantize_codes, the
  round-to-nearest path, symmetric). The backward pass treats the rounding as identity
  (straight-through estimator), so the float "latent" weights keep learning. `nima-edge quantize
  --method qat` then rounds the trained latent weights with the same functions: its codes are the
  ones the model was trained with, and every target packs them with no further rounding error.
- `8da4w` (ExecuTorch's XNNPACK scheme, `8da4w-gN` for other groups): the same int4 weights plus
  int8 per-token asymmetric fake quantization of each linear's input, as XNNPACK's dynamically
  quantized fully-connected kernels do at run time (XNNPACK's rule, as torch's reference ops
  quantized_decomposed.choose_qparams_per_token_asymmetric / quantize_per_token compute it).

Embeddings, lm_head and norms stay float, as in the quantization core, and each linear gets the group
of the quantization core's group plan (a smaller group where the scheme's does not divide its width,
float where none does), so the trained grid is the one `quantize` would use. The fake-quant forward is
switched on in place (the Linear's class becomes FakeQuantLinear: same parameters, same names, so
checkpoints and optimizer state are untouched) for the last `qat_fraction` of a run (the training loop,
train/trainer.py, decides when: pretraining and fine-tuning alike).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from nima_edge import checkpoint
from nima_edge.errors import NimaError
from nima_edge.quantization import check_params, grid, group_plan, quantizable, quantize_codes, rtn, substitutions

SCHEMES_HELP = "int4-g32 | int4-g64 | int4-g128 | int8-g32 ... | 8da4w | 8da4w-g128"
_PATTERN = re.compile(r"^(?:int(?P<bits>[48])-g(?P<group>\d+)|8da4w(?:-g(?P<dgroup>\d+))?)$")


@dataclass(frozen=True)
class QatScheme:
    name: str
    bits: int
    group_size: int
    activations: bool  # int8 per-token dynamic activations (8da4w)

    def to_dict(self) -> dict:
        return asdict(self)


def parse(name: str) -> QatScheme:
    m = _PATTERN.match(name.strip().lower())
    if not m:
        raise NimaError(f"unknown QAT scheme {name!r}", f"use one of: {SCHEMES_HELP}")
    if m["bits"]:
        scheme = QatScheme(name.lower(), int(m["bits"]), int(m["group"]), activations=False)
    else:
        scheme = QatScheme(name.lower(), 4, int(m["dgroup"] or 32), activations=True)
    check_params(scheme.bits, scheme.group_size)
    return scheme


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded tensor (bit-exact). Backward: the gradient passes to the float input unchanged."""

    @staticmethod
    def forward(ctx, x, rounded):
        return rounded.clone()  # a new tensor: autograd does not allow returning an input as is

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@torch.no_grad()
def quantized_weight(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """dequant(quant(weight)) on the quantize stage's symmetric grid, equal to rtn(weight).dequantize()."""
    out, n = weight.shape
    groups = weight.float().reshape(out * n // group_size, group_size)
    scale, zero = grid(groups, bits, symmetric=True)
    codes = quantize_codes(groups, scale, zero, bits, symmetric=True)
    return ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(out, n).to(weight.dtype)


@torch.no_grad()
def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """int8 per-token asymmetric fake quantization with XNNPACK's rule (the range always holds 0, the
    zero point is chosen to minimise the rounding error at the ends), in the arithmetic of torch's
    reference ops (qparams in fp32, quantize / dequantize in fp64): equal to them bit for bit (tested)."""
    qmin, qmax = -128, 127
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / float(qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    from_min, from_max = qmin + lo / scale, qmax + hi / scale
    zero = torch.where(from_min + from_max > 0, qmin - lo / scale, qmax - hi / scale).clamp(qmin, qmax).round()
    scale, zero = scale.double(), zero.double()
    q = (xf * (1.0 / scale) + zero).round().clamp(qmin, qmax)
    return ((q - zero) * scale).to(x.dtype)


class FakeQuantLinear(torch.nn.Linear):
    """An nn.Linear whose forward sees its fake-quantized weight (and input, for 8da4w)."""

    qat: QatScheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat.activations:
            x = _StraightThrough.apply(x, quantized_activations(x))
        w = _StraightThrough.apply(self.weight, quantized_weight(self.weight, self.qat.bits, self.qat.group_size))
        return F.linear(x, w, self.bias)


def check_model(model: torch.nn.Module, scheme: QatScheme) -> None:
    linears = quantizable(model)
    if not linears:
        raise NimaError("the model has no plain decoder linears to fake-quantize (LoRA wraps them)",
                        "QAT trains the weights that get quantized: use it with full fine-tuning (--full)")


def enable(model: torch.nn.Module, scheme: QatScheme) -> None:
    groups = group_plan(model, scheme.group_size)
    for name, m in quantizable(model).items():
        if groups[name] is None:
            continue  # no supported group divides its width: it stays float, in quantize as here
        m.__class__ = FakeQuantLinear  # same parameters and names: only forward changes
        m.qat = replace(scheme, group_size=groups[name])


def disable(model: torch.nn.Module) -> None:
    for m in quantizable(model).values():
        if isinstance(m, FakeQuantLinear):
            m.__class__ = torch.nn.Linear
            del m.qat


def is_enabled(model: torch.nn.Module) -> bool:
    return any(isinstance(m, FakeQuantLinear) for m in model.modules())


def trained_scheme(ckpt: str | Path) -> QatScheme:
    """The QAT scheme a checkpoint was trained with (nima.json "qat"), or a NimaError."""
    qat = checkpoint.read_meta(ckpt).get("qat")
    if not qat:
        raise NimaError(f"{ckpt} was not trained with quantization-aware training (nima.json has no \"qat\")",
                        "fine-tune with --qat int4-g32 first, or quantize with --method gptq / rtn")
    return parse(qat["name"])


def quantize_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """`nima-edge quantize --method qat`: the result holding the codes the QAT forward used.

    The latent float weights are rounded by the very functions the training forward used (rtn is
    grid + quantize_codes), so dequantizing the result gives the trained forward's weights bit for bit.
    """
    scheme = trained_scheme(ckpt)
    if Path(out).resolve() == Path(ckpt).resolve():
        raise NimaError(f"--out {out} is the input checkpoint", "write the quantized checkpoint to a new directory")
    model, tok = checkpoint.load(ckpt)
    check_model(model, scheme)
    groups = group_plan(model, scheme.group_size)
    result = {name: replace(rtn(m.weight, scheme.bits, groups[name]), method="qat")
              for name, m in quantizable(model).items() if groups[name]}
    info = {"source": str(ckpt), "source_sha256": checkpoint.checkpoint_hash(ckpt), "qat": scheme.to_dict(),
            "group_size": scheme.group_size, "substitutions": substitutions(groups, scheme.group_size)}
    meta = {k: v for k, v in checkpoint.read_meta(ckpt).items() if k != "quantization"}
    return checkpoint.save_quantized(out, model, tok, result, meta, info)
