"""Runtime for "tensorrt": the engine's two execution contexts (prefill and decode profiles) with the
KV cache held on the GPU as torch CUDA tensors (present.N.* of one step are the next step's past)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nima_edge.errors import NimaError
from nima_edge.runtimes.tensorrt_format import CONFIG_FILE, ENGINE_FILE, INSTALL, import_tensorrt
from nima_edge.runtime import Runtime
from nima_edge.tokenizer import Tokenizer


class TensorRTRuntime(Runtime):
    target = "tensorrt"

    def __init__(self, path: str | Path, threads: int | None = None):  # threads: CPU-side only, unused
        super().__init__()
        import torch
        path = Path(path)
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise NimaError("TensorRT engines run on an NVIDIA GPU, and torch sees none", INSTALL)
        if not (path / ENGINE_FILE).is_file() or not (path / CONFIG_FILE).is_file():
            raise NimaError(f"{path} is not a TensorRT artifact (needs {ENGINE_FILE} and {CONFIG_FILE})",
                            "pass the directory written by nima-edge export --target tensorrt")
        meta = json.loads((path / CONFIG_FILE).read_text())
        self.torch, self.device = torch, torch.device("cuda")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            (path / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise NimaError(f"TensorRT cannot deserialize {path / ENGINE_FILE}",
                            "engines are tied to the TensorRT version and GPU that built them; rebuild it here")
        self.stream = torch.cuda.Stream()
        self.contexts = {}
        for kind, index in meta["profiles"].items():
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts[kind] = ctx
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                  trt.int64: torch.int64, trt.int32: torch.int32}
        self.dtype = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in meta["inputs"] + meta["outputs"]}
        self.inputs, self.outputs = meta["inputs"], meta["outputs"]
        cfg = meta["config"]
        self.context_length = cfg["max_position_embeddings"]
        self.tokenizer = Tokenizer.from_file(path / "tokenizer.json")
        self._empty_past = torch.empty((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]),
                                       dtype=self.dtype[self.inputs[3]], device=self.device)
        self._placeholder = torch.empty(1, dtype=torch.float32, device=self.device)  # address for empty tensors
        self._reset()

    def _address(self, t) -> int:
        return t.data_ptr() if t.numel() else self._placeholder.data_ptr()

    def _run(self, ids) -> np.ndarray:
        torch, n, p = self.torch, len(ids), self.position
        ctx = self.contexts["decode" if n == 1 else "prefill"]
        feed = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, p + n),
                "position_ids": torch.arange(p, p + n)[None]}
        feed = {k: v.to(self.device, self.dtype[k]) for k, v in feed.items()}
        feed |= dict(zip(self.inputs[3:], self.past))
        for name, t in feed.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, self._address(t))
        results = []
        for name in self.outputs:
            t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtype[name], device=self.device)
            ctx.set_tensor_address(name, self._address(t))
            results.append(t)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see its log)")
        self.stream.synchronize()
        logits, *self.past = results
        return logits[0, -1].float().cpu().numpy()

    def _prefill(self, ids):
        return self._run(list(ids))

    def _decode(self, token_id):
        return self._run([token_id])

    def _reset(self):
        self.past = [self._empty_past] * (len(self.inputs) - 3)

    def close(self):
        self.contexts, self.engine = {}, None
