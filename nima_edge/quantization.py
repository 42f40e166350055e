"""The quantization result (neutral core, no export/ imports) shared by the quantize stage, every
exporter and the fake-quant reference: integer codes, per-group scales and zero points.

Quantize once (GPTQ or round-to-nearest), save the result beside the float weights in the
checkpoint, and let each exporter only *pack* it (export/packing.py). The fake-quant model built
from it is the reference that quantized artifacts are verified against.

Conventions (the contract with the exporters):
- Groups run along the input dimension: weight [out, in] -> [out, in // group, group].
- dequant = (code - zero) * scale, codes and zeros uint8, scales fp32 holding fp16-exact values.
- Symmetric grids fit llama.cpp's blocks, so GGUF packing is exact:
    4-bit (Q4_0, (q - 8) * d): zero = 8, codes 0..15; scale = absmax / 8 when the group's extreme
           element is negative (it lands on code 0), absmax / 7 when it is positive (code 15).
    8-bit (Q8_0, qs * d): scale = absmax / 127, zero = 128, codes 1..255 (qs = code - 128 in -127..127).
- Asymmetric: scale = (max - min) / (2**bits - 1) over a range that includes 0, zero = round(-min / scale).
- Group plan: a tensor whose input width the requested group does not divide (SmolLM2's 576 with group
  128) gets the largest supported group that divides it, else stays float; every substitution is listed
  in quantization.json ("substitutions") and so reaches the exporters and manifests.
- Every scale is positive (XNNPACK rejects others; an all-zero group gets scale 1) and rounded to
  fp16 BEFORE codes are computed, so fp16 containers reproduce the reference exactly.
- Embeddings and lm_head stay float (not part of the result): for these small vocabularies they are a
  small share of the weights, and keeping them float keeps the output distribution close to fp32 on
  every target. Only the decoder linears (q/k/v/o, gate/up/down) are quantized.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from nima_edge.errors import NimaError
from nima_edge.model import NimaForCausalLM

QUANT_TENSORS = "quantization.safetensors"
QUANT_JSON = "quantization.json"
FORMAT_VERSION = 1
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("gptq", "rtn")
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class QuantizedWeight:
    codes: torch.Tensor   # uint8 [out, in], 0 .. 2**bits - 1
    scales: torch.Tensor  # float32 [out, in // group_size], fp16-exact
    zeros: torch.Tensor   # uint8 [out, in // group_size]; 2**(bits-1) everywhere when symmetric
    bits: int
    group_size: int
    symmetric: bool
    method: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        out, n = self.codes.shape
        g = self.group_size
        q = self.codes.view(out, n // g, g).float() - self.zeros.float().unsqueeze(-1)
        return (q * self.scales.unsqueeze(-1)).reshape(out, n)


def check_params(bits: int, group_size: int, method: str | None = None) -> None:
    if bits not in BITS:
        raise NimaError(f"{bits}-bit quantization is not supported", f"use --bits {' or '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise NimaError(f"group size {group_size} is not supported",
                        f"use --group {', '.join(map(str, GROUP_SIZES))}")
    if method is not None and method not in METHODS:
        raise NimaError(f"unknown quantization method {method!r}", f"use --method {' or '.join(METHODS)}")


def check_width(name: str, weight: torch.Tensor, group_size: int) -> None:
    if weight.shape[1] % group_size:
        raise NimaError(f"{name} has input width {weight.shape[1]}, not a multiple of the group size {group_size}",
                        "pick a smaller --group that divides every layer's width (32 divides all presets)")


def grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of `w` ([rows, group] -> [rows], [rows]); the scale is fp16-exact fp32."""
    w = w.float()
    qmax = 2 ** bits - 1
    if symmetric:
        zero = torch.full((w.shape[0],), 2 ** (bits - 1), dtype=torch.float32, device=w.device)
        amax = w.abs().amax(dim=1)
        if bits == 4:
            # Codes -8..7: a negative extreme lands exactly on -8 (step amax/8), a positive one on +7
            # (step amax/7). llama.cpp gets the finer step for both signs with a negative scale, but
            # XNNPACK rejects scales that are not positive, so the sign stays in the codes.
            extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            scale = torch.where(extreme < 0, amax / 8.0, amax / 7.0)
        else:  # llama.cpp Q8_0: codes -127..127
            scale = amax / 127.0
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / qmax
        scale16 = scale.half().float()
        zero = torch.round(-lo / scale16.where(scale16 != 0, 1.0)).clamp(0, qmax)
    scale = scale.half().float()  # fp16 first: codes are computed against the scale that gets stored
    scale = torch.where(scale == 0, 1.0, scale)  # an all-zero group: any positive scale codes it exactly
    if not torch.isfinite(scale).all():
        raise NimaError("a weight group's scale overflows fp16", "the checkpoint holds huge or non-finite weights")
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   symmetric: bool) -> torch.Tensor:
    """Codes (float, integral) of `w` [rows, cols] on the grid (scale, zero) given per row."""
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    lowest = 1 if symmetric and bits == 8 else 0  # Q8_0 (and symmetric int8 kernels) use -127..127
    return torch.clamp(torch.round(w.float() / scale) + zero, lowest, 2 ** bits - 1)


def rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest on the grid above: the baseline, and what exporters use on unquantized checkpoints."""
    check_params(bits, group_size)
    check_width("weight", weight, group_size)
    out, n = weight.shape
    groups = weight.detach().float().reshape(out * n // group_size, group_size)
    scale, zero = grid(groups, bits, symmetric)
    codes = quantize_codes(groups, scale, zero, bits, symmetric)
    return QuantizedWeight(codes=codes.to(torch.uint8).reshape(out, n),
                           scales=scale.reshape(out, n // group_size),
                           zeros=zero.to(torch.uint8).reshape(out, n // group_size),
                           bits=bits, group_size=group_size, symmetric=symmetric, method="rtn")


def quantizable(model: NimaForCausalLM) -> dict[str, torch.nn.Linear]:
    """The decoder linears by HF weight name (embeddings and lm_head stay float; see the module doc)."""
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_SUFFIXES}


def choose_group(width: int, requested: int) -> int | None:
    """The group for a tensor of input width `width`: the requested one when it divides the width, else the
    largest supported smaller group that does, else None (the tensor stays float: GGUF blocks need 32)."""
    for g in sorted((g for g in GROUP_SIZES if g <= requested), reverse=True):
        if width % g == 0:
            return g
    return None


def group_plan(model: NimaForCausalLM, requested: int) -> dict[str, int | None]:
    """The group of every decoder linear by HF weight name (None: it stays float)."""
    return {name: choose_group(m.in_features, requested) for name, m in quantizable(model).items()}


def result_plan(model: NimaForCausalLM, result: dict[str, QuantizedWeight]) -> dict[str, int | None]:
    """The group plan a result was made with (None: the tensor is not in it, so it stays float)."""
    return {name: result[name].group_size if name in result else None for name in quantizable(model)}


def substitutions(plan: dict[str, int | None], requested: int) -> list[dict]:
    """The tensors the plan does not give the requested group, as recorded and reported."""
    return [{"tensor": name, "requested_group": requested, "group": g,
             "instead": f"group {g}" if g else "float (no supported group divides its width)"}
            for name, g in sorted(plan.items()) if g != requested]


def describe_substitutions(subs: list[dict]) -> list[str]:
    """One line per kind of substitution, e.g. 'group 128 -> group 64: 20 tensors (q_proj, k_proj, ...)'."""
    kinds: dict[tuple, list[str]] = {}
    for s in sorted(subs, key=lambda s: -(s["group"] or 0)):  # smaller groups first, float last
        kinds.setdefault((s["requested_group"], s["instead"]), []).append(s["tensor"])
    lines = []
    for (req, instead), names in kinds.items():
        short = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in names})
        lines.append(f"group {req} -> {instead}: {len(names)} tensors ({', '.join(short)})")
    return lines


def rtn_model(model: NimaForCausalLM, bits: int, group_size: int, symmetric: bool = True) -> dict[str, QuantizedWeight]:
    """Round-to-nearest of every decoder linear along the group plan (model unchanged): what exporters
    use on an unquantized checkpoint."""
    check_params(bits, group_size)
    plan = group_plan(model, group_size)
    return {name: rtn(m.weight, bits, plan[name], symmetric) for name, m in quantizable(model).items() if plan[name]}


def result_files(qweights: dict[str, QuantizedWeight], info: dict | None = None) -> tuple[dict[str, bytes], dict]:
    """The two files that carry a result in a checkpoint ({name: bytes}) and its summary for nima.json."""
    tensors, layers = {}, {}
    for name, q in sorted(qweights.items()):
        tensors[f"{name}.codes"] = q.codes.contiguous()
        tensors[f"{name}.scales"] = q.scales.contiguous()
        tensors[f"{name}.zeros"] = q.zeros.contiguous()
        layers[name] = {"bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric, "method": q.method}
    first = next(iter(layers.values()), {})
    doc = {"format": "nima-quant", "version": FORMAT_VERSION, **first, **(info or {}), "layers": layers}
    files = {QUANT_TENSORS: save(tensors, metadata={"format": "nima-quant"}),
             QUANT_JSON: (json.dumps(doc, indent=2) + "\n").encode()}
    return files, {k: v for k, v in doc.items() if k != "layers"}


def load_quant(ckpt_dir: str | Path) -> dict[str, QuantizedWeight] | None:
    """The quantization result keyed by HF weight name, or None for an unquantized checkpoint."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / QUANT_JSON).is_file():
        return None
    fix = f"re-run nima-edge quantize on the float checkpoint to rewrite {ckpt}"
    try:
        doc = json.loads((ckpt / QUANT_JSON).read_text())
        tensors = load_file(str(ckpt / QUANT_TENSORS))
    except Exception as e:  # json, safetensors and OS errors all mean the same thing to the user
        raise NimaError(f"the quantization result in {ckpt} is unreadable: {e}", fix) from e
    if doc.get("format") != "nima-quant" or doc.get("version") != FORMAT_VERSION:
        raise NimaError(f"{ckpt / QUANT_JSON} is not a nima-quant v{FORMAT_VERSION} file", fix)
    result = {}
    for name, p in doc["layers"].items():
        try:
            q = QuantizedWeight(codes=tensors[f"{name}.codes"], scales=tensors[f"{name}.scales"],
                                zeros=tensors[f"{name}.zeros"], bits=p["bits"], group_size=p["group_size"],
                                symmetric=p["symmetric"], method=p["method"])
        except KeyError as e:
            raise NimaError(f"{ckpt / QUANT_TENSORS} lacks {e} for {name}", fix) from e
        if q.scales.shape != (q.shape[0], q.shape[1] // q.group_size) or q.zeros.shape != q.scales.shape:
            raise NimaError(f"{name}: codes {q.shape}, scales {tuple(q.scales.shape)} do not match group "
                            f"{q.group_size}", fix)
        result[name] = q
    return result


def apply_quant(model: NimaForCausalLM, qweights: dict[str, QuantizedWeight]) -> NimaForCausalLM:
    """Replace each quantized linear's weight with its dequantized value (in place)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, q in qweights.items():
            if name not in params or params[name].shape != q.shape:
                raise NimaError(f"the quantization result names {name} {q.shape}, which the model lacks or "
                                "shapes differently", "the result belongs to another model; re-run nima-edge quantize")
            params[name].copy_(q.dequantize())
    return model


def describe(qweights: dict[str, QuantizedWeight]) -> str:
    """e.g. '4-bit gptq, group 32, symmetric' (all layers share one scheme when written by quantize)."""
    schemes = sorted({(q.bits, q.method, q.group_size, q.symmetric) for q in qweights.values()})
    return "; ".join(f"{b}-bit {m}, group {g}, {'symmetric' if s else 'asymmetric'}" for b, m, g, s in schemes)
