"""Runtime for "onnx-portable": an ONNX Runtime InferenceSession driven by a KV-cache loop.

Each call feeds the new tokens with the cache so far (past_key_values.N.*) and keeps the returned
present.N.* as the next past; the tokenizer and config come from the file's metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nima_edge.errors import NimaError
from nima_edge.runtimes.onnx_portable_format import META_CONFIG, META_TOKENIZER, META_TOKENIZER_SETTINGS, io_names
from nima_edge.runtime import Runtime
from nima_edge.tokenizer import Tokenizer


def open_session(path: Path, threads: int | None, accuracy_level: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # ORT fuses blocked DequantizeLinear + MatMul into MatMulNBits. Accuracy level 4 (ORT's default) runs
    # int8 activations: fast, ~1e-2 off the fake-quant reference. Level 1 keeps fp32 activations and is
    # exact, but ORT 1.32 then leaves int8 DequantizeLinear unfused (dequantized every step: slow).
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types for unreadable models
        raise NimaError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}",
                        "the file is corrupt or truncated; re-export it with nima-edge export") from e


def read_metadata(session: ort.InferenceSession, path: Path) -> tuple[Tokenizer, dict]:
    meta = session.get_modelmeta().custom_metadata_map
    if META_TOKENIZER not in meta or META_CONFIG not in meta:
        raise NimaError(f"{path} has no nima-edge metadata (tokenizer, config)",
                        "export it with nima-edge export --target onnx-portable")
    return Tokenizer.from_str(meta[META_TOKENIZER], meta.get(META_TOKENIZER_SETTINGS)), json.loads(meta[META_CONFIG])


class OnnxPortableRuntime(Runtime):
    target = "onnx-portable"

    def __init__(self, path: str | Path, threads: int | None = None, accuracy_level: int = 4):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise NimaError(f"{path} is not an .onnx file", "pass the model.onnx written by --target onnx-portable")
        self.session = open_session(path, threads, accuracy_level)
        self.tokenizer, cfg = read_metadata(self.session, path)
        self.context_length = cfg["max_position_embeddings"]
        self.inputs, self.outputs = io_names(cfg["num_hidden_layers"])
        self._empty = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]), dtype=np.float32)
        self._reset()

    def _run(self, ids) -> np.ndarray:
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, self.position + n), dtype=np.int64),
                "position_ids": np.arange(self.position, self.position + n, dtype=np.int64)[None],
                **dict(zip(self.inputs[3:], self.past))}
        logits, *self.past = self.session.run(self.outputs, feed)
        return logits[0, -1]

    def _prefill(self, ids):
        return self._run(list(ids))

    def _decode(self, token_id):
        return self._run([token_id])

    def _reset(self):
        self.past = [self._empty] * (len(self.inputs) - 3)
