"""GPTQ (Frantar et al., 2022), in the style of the reference implementation and gpt-fast.

Written here rather than taken from torchao/AutoGPTQ because the result must land on our grids
(llama.cpp's signed Q4_0 scale, fp16-rounded scales before rounding codes, contiguous groups
along the input dimension) so every exporter packs it losslessly; the libraries fix their own grids.

Per linear layer W [rows, cols] with calibration inputs X [n, cols]:
  H = 2/n * X^T X (+ damping), U = chol(H^-1) upper;
  walk the columns in blocks; quantize one column, spread its error over the columns not yet
  quantized in proportion to U, and apply each block's accumulated update to the rest lazily.
The model is processed decoder layer by decoder layer; each layer is calibrated on the outputs
of the already-quantized layers before it ("true sequential" inside a layer too).
"""
from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import Progress

from nima_edge.errors import NimaError
from nima_edge.quantization import QuantizedWeight, check_width, grid, quantize_codes
from nima_edge.model import NimaForCausalLM

# Sub-layers quantized together, in forward order: each group's inputs depend on the groups before it.
SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


class Hessian:
    """Running H = 2/n * sum x x^T over every input row a linear layer sees."""

    def __init__(self, cols: int):
        self.H = torch.zeros(cols, cols, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += (x.T @ x).double()  # fp32 matmul for speed, fp64 running sum over batches


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; more damping if H is not positive definite."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    mean_diag = torch.diag(H).mean()
    for attempt in range(5):
        L, info = torch.linalg.cholesky_ex(H + damp * 10 ** attempt * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise NimaError("GPTQ: the calibration Hessian is not positive definite even with heavy damping",
                    "use more calibration windows (--samples), or --method rtn")


def gptq(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
         damp: float = 0.01, act_order: bool = False, block_size: int = 128) -> QuantizedWeight:
    """Quantize one weight [rows, cols] given its input Hessian [cols, cols]."""
    check_width("weight", weight, group_size)
    if block_size % group_size:
        raise ValueError(f"block size {block_size} must be a multiple of the group size {group_size}")
    W = weight.detach().double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = cols // group_size
    scales = torch.zeros(rows, n_groups, dtype=torch.float32)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float32)
    if act_order:
        # Columns are visited by decreasing Hessian diagonal, so the grid of each (contiguous, original
        # order) group is fixed up front from the float weights ("static groups"), as exporters need.
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = grid(W[:, g * group_size:(g + 1) * group_size], bits, symmetric)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)
    codes = torch.zeros(rows, cols, dtype=torch.float64)

    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            g = int(perm[col]) // group_size
            if not act_order and col % group_size == 0:  # the grid of a group comes from its updated weights
                scales[:, g], zeros[:, g] = grid(W1[:, i:i + group_size], bits, symmetric)
            w, d = W1[:, i], U1[i, i]
            q = quantize_codes(w.unsqueeze(1), scales[:, g], zeros[:, g], bits, symmetric).squeeze(1).double()
            codes[:, col] = q
            dq = (q - zeros[:, g].double()) * scales[:, g].double()
            err = (w - dq) / d
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]  # the lazy batched update of the columns after this block

    codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=scales, zeros=zeros.to(torch.uint8),
                           bits=bits, group_size=group_size, symmetric=symmetric, method="gptq")


@torch.no_grad()
def gptq_model(model: NimaForCausalLM, calib: torch.Tensor, bits: int, plan: dict[str, int | None],
               symmetric: bool = True, damp: float = 0.01, act_order: bool = False,
               batch_size: int = 8) -> dict[str, QuantizedWeight]:
    """GPTQ every decoder linear of `model` on calibration windows `calib` [n, T] (token ids, BOS first),
    each with its group from `plan` (HF weight name -> group, None: left float; see group_plan).

    The model's linear weights are replaced by their dequantized values as it goes (that is what
    the next layer is calibrated on); the returned result is keyed by HF weight name.
    """
    model.eval()
    batches = [model.embed(calib[i:i + batch_size]) for i in range(0, len(calib), batch_size)]
    result: dict[str, QuantizedWeight] = {}
    layers = model.model.layers
    with Progress(transient=True, disable=not Console().is_terminal) as progress:  # no blank lines in logs
        task = progress.add_task("GPTQ calibration", total=len(layers) * sum(len(s) for s in SEQUENTIAL))
        for li, layer in enumerate(layers):
            for names in SEQUENTIAL:
                # The linears of one step read the same input, so they share one Hessian, and GPTQ treats
                # rows independently: quantizing them stacked is the same as one by one, and faster.
                modules = {n: layer.get_submodule(n) for n in names}
                first = next(iter(modules.values()))
                hessian = Hessian(first.in_features)
                hook = first.register_forward_hook(lambda _m, inp, _out: hessian.add(inp[0]))
                try:
                    for x in batches:
                        model.forward_layer(li, x)
                finally:
                    hook.remove()
                full = {n: f"model.layers.{li}.{n}.weight" for n in names}
                group = plan[full[names[0]]]  # one input width, so one group
                progress.update(task, description=f"GPTQ layer {li} {'/'.join(n.split('.')[-1] for n in names)}")
                if group is not None:  # else no supported group divides the width: they stay float
                    q = gptq(torch.cat([m.weight for m in modules.values()]), hessian.H, bits, group, symmetric,
                             damp, act_order)
                    start = 0
                    for n, m in modules.items():
                        rows = slice(start, start + m.out_features)
                        start = rows.stop
                        result[full[n]] = part = QuantizedWeight(
                            codes=q.codes[rows], scales=q.scales[rows], zeros=q.zeros[rows], bits=bits,
                            group_size=group, symmetric=symmetric, method="gptq")
                        m.weight.copy_(part.dequantize())
                progress.advance(task, len(names))
            batches = [model.forward_layer(li, x) for x in batches]  # inputs of the next layer
    return result
