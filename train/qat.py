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

Training a quantization result (`finetune Q --train-quantized`, Q a checkpoint that carries one, e.g.
GPTQ's): each quantized linear becomes a QuantTrainedLinear whose weight IS the result's dequantization:
per-group scales trainable (as in LSQ, and EfficientQAT's end-to-end stage), codes trained through latent
weights and the straight-through estimator, starting from the result's own codes (or fixed, with
`--fixed-codes`). The forward uses each scale rounded to fp16, the precision every target stores, so
the trained result packs with no rounding at all. Started from GPTQ this leaves the smallest gap of
any method measured (docs/quantization.md).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from nima_edge import checkpoint
from nima_edge.errors import NimaError
from nima_edge.quantization import (QuantizedWeight, check_params, grid, group_plan, quantizable, quantize_codes, rtn,
                                    substitutions)

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


# --- training a quantization result ---------------------------------------------------------------

TRAINED_SUFFIX = {True: "+qat", False: "+scales"}  # a trained result's method, e.g. "gptq+qat", by codes trained


def _as_stored(scales: torch.Tensor) -> torch.Tensor:
    """The scales rounded to fp16 (what GGUF, ONNX and ExecuTorch store) in the forward; the gradient
    reaches the fp32 master copy unchanged. s + (s16 - s) is exactly s16 (the difference is exact)."""
    return scales + (scales.half().float() - scales).detach()


class QuantTrainedLinear(torch.nn.Module):
    """A decoder linear as its quantization result, trained: the per-group scales always, and with
    `codes` the codes too, as latent float weights rounded onto the grid of the current scales with
    the straight-through estimator (LSQ, Esser et al. 2020). Without `codes` they stay fixed.

    The latent weights start at the result's dequantized values, so round(latent / scale) gives back
    its codes exactly and training starts from the result itself (e.g. GPTQ's choice of codes).
    """

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None, codes: bool):
        super().__init__()
        out, n = q.shape
        self.bits, self.group_size, self.symmetric, self.method = q.bits, q.group_size, q.symmetric, q.method
        self.register_buffer("zeros", q.zeros.clone())
        self.register_buffer("codes", q.codes.clone())  # the fixed codes, or the ones the latent weights started at
        self.scales = torch.nn.Parameter(q.scales.clone().float())
        self.latent = (torch.nn.Parameter(q.dequantize().view(out, n // q.group_size, q.group_size).clone())
                       if codes else None)
        self.bias = bias

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes as floats [out, groups, group], stored scales [out, groups, 1]) of the forward."""
        scales = _as_stored(self.scales).unsqueeze(-1)
        if self.latent is None:
            out, n = self.codes.shape
            return self.codes.view(out, n // self.group_size, self.group_size).float(), scales
        steps = self.latent / scales
        codes = _StraightThrough.apply(steps, steps.detach().round()) + self.zeros.float().unsqueeze(-1)
        return codes.clamp(0, 2 ** self.bits - 1), scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scales = self._grid()  # below: QuantizedWeight.dequantize's arithmetic
        w = ((codes - self.zeros.float().unsqueeze(-1)) * scales).reshape(self.codes.shape)
        return F.linear(x, w.to(x.dtype), self.bias)

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        codes, scales = self._grid()
        suffix = TRAINED_SUFFIX[self.latent is not None]
        method = self.method if self.method.endswith(tuple(TRAINED_SUFFIX.values())) else self.method + suffix
        return QuantizedWeight(codes=codes.reshape(self.codes.shape).to(torch.uint8).cpu(),
                               scales=scales.squeeze(-1).cpu(), zeros=self.zeros.cpu(), bits=self.bits,
                               group_size=self.group_size, symmetric=self.symmetric, method=method)


def attach_result(model: torch.nn.Module, result: dict[str, QuantizedWeight], codes: bool) -> None:
    """Freeze `model` and turn each linear of `result` (keys are weight names) into a QuantTrainedLinear."""
    model.requires_grad_(False)
    linears = quantizable(model)
    for name, q in result.items():
        if name not in linears or linears[name].weight.shape != q.shape:
            raise NimaError(f"the quantization result names {name} {q.shape}, which the model lacks or shapes "
                            "differently", "the result belongs to another model; re-run nima-edge quantize")
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), attr, QuantTrainedLinear(q, linears[name].bias, codes))


def trained_result(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """The quantization result a model with QuantTrainedLinears stands for, keyed by weight name."""
    return {f"{name}.weight": m.result() for name, m in model.named_modules() if isinstance(m, QuantTrainedLinear)}


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{p}": t for name, m in model.named_modules() if isinstance(m, QuantTrainedLinear)
            for p, t in (("scales", m.scales), ("latent", m.latent)) if t is not None}


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 tensors being trained (scales not yet rounded to fp16, latent weights), for a bit-exact resume."""
    return {k: t.detach().cpu() for k, t in _trained(model).items()}


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put tensors saved by `trained_state` back into the model."""
    mine = _trained(model)
    if set(mine) != set(state) or any(t.shape != state[k].shape for k, t in mine.items()):
        raise NimaError("the saved training state belongs to another quantization result or setting",
                        "resume with the checkpoint the run started from, or start a new run")
    with torch.no_grad():
        for k, t in mine.items():
            t.copy_(state[k])
