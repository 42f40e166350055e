"""Pack one quantization result into each target's layout (and back, for the round-trip tests).

Every function here only rearranges bits: the codes, scales and zero points are the ones GPTQ/RTN
chose, so every target dequantizes to exactly the fake-quant reference weights.

- GGUF Q4_0 / Q8_0 (llama.cpp): blocks of 32 along the input dimension, fp16 scale first.
  Q4_0 block = d (fp16) + 16 bytes, byte j = code[j] | code[j + 16] << 4, value (code - 8) * d.
  Q8_0 block = d (fp16) + 32 int8 qs, value qs * d.
  Symmetric results only; a group of 64/128 splits into blocks of 32 sharing its scale.
- ONNX Runtime MatMulNBits (com.microsoft): B uint8 [N, K / block, block * bits / 8] with codes
  packed low nibble first along K, scales [N, K / block], zero points uint8 [N, ceil(K / block * bits / 8)]
  (4-bit: two per byte, low nibble first). Omitted zero points mean 2**(bits-1): our symmetric zero.
- torchao IntxUnpackedToInt8Tensor (what ExecuTorch lowers to XNNPACK): int8 qdata [N, K] =
  code - 2**(bits-1), int8 zero_point = zero - 2**(bits-1), scale [N, K / group]. XNNPACK's group-wise
  kernel takes 4-bit symmetric weights only and stores the scales as bf16 (the ExecuTorch delegate
  converts them), so that path is not bit-exact to the fp16-exact scales here.
"""
from __future__ import annotations

import numpy as np
import torch

from nima_edge.errors import NimaError
from nima_edge.quantization import QuantizedWeight

GGUF_BLOCK = 32


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _per_block(q: QuantizedWeight, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zeros repeated so there is one per `block` columns (block divides the group size)."""
    rep = q.group_size // block
    return np.repeat(_np(q.scales), rep, axis=1), np.repeat(_np(q.zeros), rep, axis=1)


# --- GGUF ------------------------------------------------------------------------------------

def gguf_type(q: QuantizedWeight):
    """The GGMLQuantizationType this result packs into losslessly."""
    from gguf import GGMLQuantizationType
    if not q.symmetric:
        raise NimaError("GGUF Q4_0/Q8_0 hold symmetric weights only; this result is asymmetric",
                        "re-quantize with symmetric scales (the default) for the gguf target")
    return GGMLQuantizationType.Q4_0 if q.bits == 4 else GGMLQuantizationType.Q8_0


def pack_gguf(q: QuantizedWeight) -> np.ndarray:
    """uint8 [out, in / 32 * bytes_per_block]: the rows of a GGUF Q4_0 or Q8_0 tensor."""
    gguf_type(q)
    out, n = q.shape
    nb = n // GGUF_BLOCK
    scales, _ = _per_block(q, GGUF_BLOCK)
    d = scales.astype(np.float16).reshape(out, nb, 1).view(np.uint8)  # 2 bytes, little-endian
    codes = _np(q.codes).reshape(out, nb, GGUF_BLOCK)
    if q.bits == 4:
        qs = codes[..., :16] | (codes[..., 16:] << np.uint8(4))
    else:
        qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(out, -1)


def unpack_gguf(data: np.ndarray, bits: int, shape: tuple[int, int]) -> QuantizedWeight:
    """Inverse of pack_gguf (group size 32)."""
    out, n = shape
    nb = n // GGUF_BLOCK
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(out, nb, -1)
    scales = blocks[..., :2].copy().view(np.float16).reshape(out, nb).astype(np.float32)
    qs = blocks[..., 2:]
    if bits == 4:
        codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)
    else:
        codes = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    zero = 2 ** (bits - 1)
    return QuantizedWeight(codes=torch.from_numpy(codes.reshape(out, n).copy()), scales=torch.from_numpy(scales),
                           zeros=torch.full((out, nb), zero, dtype=torch.uint8), bits=bits,
                           group_size=GGUF_BLOCK, symmetric=True, method="unknown")


# --- ONNX Runtime MatMulNBits --------------------------------------------------------------------

def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis: 4-bit codes two per byte, element 2i in the low nibble (pads an odd count)."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))).astype(np.uint8)


def _unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count].astype(np.uint8)
    both = np.stack([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)
    return both.reshape(packed.shape[:-1] + (-1,))[..., :count]


def pack_matmul_nbits(q: QuantizedWeight, zero_points: bool | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero_points) for MatMulNBits(K=in, N=out, bits, block_size=group_size).

    zero_points defaults to None for symmetric results (the operator's default zero is ours) and
    is always given for asymmetric ones. Scales are fp32; casting them to fp16 is lossless.
    """
    N, K = q.shape
    kb = K // q.group_size
    B = _pack_low_first(_np(q.codes).reshape(N, kb, q.group_size), q.bits)
    if zero_points is None:
        zero_points = not q.symmetric
    zp = _pack_low_first(_np(q.zeros), q.bits) if zero_points else None
    return B, _np(q.scales).astype(np.float32), zp


def unpack_matmul_nbits(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                        block_size: int) -> QuantizedWeight:
    """Inverse of pack_matmul_nbits."""
    N, kb, _ = B.shape
    codes = _unpack_low_first(B, bits, block_size).reshape(N, kb * block_size)
    symmetric = zero_points is None
    zeros = (np.full((N, kb), 2 ** (bits - 1), np.uint8) if symmetric
             else _unpack_low_first(np.asarray(zero_points).reshape(N, -1), bits, kb))
    return QuantizedWeight(codes=torch.from_numpy(codes.copy()),
                           scales=torch.from_numpy(np.asarray(scales, np.float32).reshape(N, kb).copy()),
                           zeros=torch.from_numpy(zeros.copy()), bits=bits, group_size=block_size,
                           symmetric=symmetric, method="unknown")


# --- torchao / ExecuTorch (XNNPACK) ----------------------------------------------------------------

def pack_intx(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qdata int8 [N, K], scale fp32 [N, K / group], zero_point int8 [N, K / group]), signed-centred."""
    mid = 2 ** (q.bits - 1)
    qdata = (q.codes.to(torch.int16) - mid).to(torch.int8)
    zero_point = (q.zeros.to(torch.int16) - mid).to(torch.int8)
    return qdata, q.scales.clone(), zero_point


def unpack_intx(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> QuantizedWeight:
    """Inverse of pack_intx."""
    mid = 2 ** (bits - 1)
    zeros = (zero_point.to(torch.int16) + mid).to(torch.uint8)
    group = qdata.shape[1] // scale.shape[1]
    return QuantizedWeight(codes=(qdata.to(torch.int16) + mid).to(torch.uint8), scales=scale.float(), zeros=zeros,
                           bits=bits, group_size=group, symmetric=bool((zeros == mid).all()), method="unknown")


def to_torchao(q: QuantizedWeight, dtype: torch.dtype = torch.float32):
    """The weight as torchao's IntxUnpackedToInt8Tensor (block (1, group)), ready for torch.export."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    qdata, scale, zero_point = pack_intx(q)
    return IntxUnpackedToInt8Tensor(qdata, scale.to(dtype), zero_point, target_dtype=getattr(torch, f"int{q.bits}"),
                                    block_size=(1, q.group_size), dtype=dtype, activation_quantization=None)
