"""Runtime for "onnx": ONNX Runtime GenAI's Generator over the exported directory.

The Generator owns the KV cache (a shared past/present buffer of the full context); we feed it our
own token ids with append_tokens and read the last position's logits with get_logits, so sampling
stays the shared one in nima_edge.sampling. Reset rewinds the generator to an empty sequence.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime
from nima_edge.runtimes.onnx_format import GENAI_CONFIG
from nima_edge.tokenizer import Tokenizer


def native_libraries(config) -> list[str]:
    """Every `*library*` entry (e.g. session_options.custom_ops_library) anywhere in a genai_config."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            if "library" in key.lower() and value:
                found.append(f"{key}={value}")
            found += native_libraries(value)
    elif isinstance(config, list):
        for item in config:
            found += native_libraries(item)
    return found


class OnnxGenaiRuntime(Runtime):
    target = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None, allow_custom_ops: bool = False):
        super().__init__()
        path = Path(path)
        if not (path / GENAI_CONFIG).is_file():
            raise NimaError(f"{path} is not an ONNX Runtime GenAI directory (no {GENAI_CONFIG})",
                            "pass the directory written by nima-edge export --target onnx")
        try:
            genai = json.loads((path / GENAI_CONFIG).read_text())
            if not allow_custom_ops and (libs := native_libraries(genai)):
                raise NimaError(f"{path / GENAI_CONFIG} asks to load native code ({', '.join(libs)}); an artifact's "
                                "config is data, so nima-edge does not load libraries it names",
                                "remove the entry, or if you built that library yourself and trust it, load the "
                                "command with --allow-custom-ops (in Python: load_runtime(path, allow_custom_ops=True))")
            self.context_length = genai["model"]["context_length"]
            config = og.Config(str(path))
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
            self.model = og.Model(config)
        except (json.JSONDecodeError, KeyError, RuntimeError) as e:
            raise NimaError(f"ONNX Runtime GenAI cannot load {path}: {str(e).splitlines()[0][:300]}",
                            "the artifact is corrupt or incomplete; re-export it with nima-edge export") from e
        self.tokenizer = Tokenizer.from_file(path / "tokenizer.json")
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context_length)
        self.generator = og.Generator(self.model, params)

    def _logits(self) -> np.ndarray:
        return np.asarray(self.generator.get_logits())[0, -1]

    def _prefill(self, ids):
        self.generator.append_tokens(list(ids))
        return self._logits()

    def _decode(self, token_id):
        self.generator.append_tokens([token_id])
        return self._logits()

    def _reset(self):
        if self.generator.token_count():
            self.generator.rewind_to(0)

    def close(self):
        self.generator = self.model = None
