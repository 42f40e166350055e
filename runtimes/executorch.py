"""ExecuTorch runtime adapter: runs an exported `.pte` (XNNPACK, static KV cache) through executorch.runtime.

Accepts the export directory (model.pte + tokenizer.json) or the `.pte` inside it. The program must
have the LLM interface the exporter writes: forward(tokens[1, T], input_pos[1]) -> logits[1, vocab]
and the constant metadata methods; anything else is refused with a clear error.

Each forward call goes through ExecuTorch's C++ Module (runtimes/executorch_native.py, built once)
where a C++ compiler is available, else through the Python bindings; `loop` says which.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nima_edge import native_log
from nima_edge.errors import NimaError, require
from nima_edge.runtime import Runtime
from nima_edge.runtimes import executorch_native
from nima_edge.runtimes.executorch_format import PTE_NAME
from nima_edge.tokenizer import Tokenizer

REEXPORT = "re-export it: nima-edge export CKPT --target executorch --out DIR"


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(the .pte, the tokenizer.json beside it) for an export directory or a .pte path."""
    path = Path(path)
    pte = path / PTE_NAME if path.is_dir() else path
    if not pte.is_file():
        raise NimaError(f"no ExecuTorch program at {pte}", "pass the export directory or its model.pte")
    tok = pte.parent / "tokenizer.json"
    if not tok.is_file():
        raise NimaError(f"{pte} has no tokenizer.json beside it", REEXPORT)
    return pte, tok


def _load_program(pte: Path):
    require("executorch.extension.llm.custom_ops.custom_ops", "executorch", "the executorch runtime")  # llama:: kernels
    ETRuntime = require("executorch.runtime", "executorch", "the executorch runtime").Runtime
    try:
        return ETRuntime.get().load_program(pte)
    except Exception as e:  # the bindings raise RuntimeError/ValueError with an error code
        raise NimaError(f"{pte} is not a loadable ExecuTorch program (corrupt, truncated or from an "
                        f"incompatible ExecuTorch): {e}", REEXPORT) from e


def _check_interface(pte: Path, program) -> dict:
    """Read the metadata methods and check forward's signature; return the metadata."""
    names = set(program.method_names)
    needed = {"forward", "get_max_context_len", "get_max_seq_len", "get_eos_ids", "use_kv_cache"}
    if missing := sorted(needed - names):
        raise NimaError(f"{pte} lacks the LLM interface (missing methods {missing})", REEXPORT)
    meta = {name: program.load_method(name).execute([]) for name in names if name != "forward"}
    fwd = program.load_method("forward")
    mm = fwd.metadata
    ok = mm.num_inputs() == 2 and mm.num_outputs() == 1
    if ok:
        tokens, pos = mm.input_tensor_meta(0), mm.input_tensor_meta(1)
        ok = len(tokens.sizes()) == 2 and tuple(pos.sizes()) == (1,) and len(mm.output_tensor_meta(0).sizes()) == 2
    if not ok or not meta["use_kv_cache"][0]:
        raise NimaError(f"{pte} is not a KV-cache LLM program: forward must take tokens[1, T] and input_pos[1] "
                        f"and return logits[1, vocab] (found {mm})", REEXPORT)
    return {"forward": fwd, **{k: v[0] if len(v) == 1 and k != "get_eos_ids" else v for k, v in meta.items()}}


class ExecuTorchRuntime(Runtime):
    target = "executorch"

    def __init__(self, path: str | Path, threads: int | None = None, loop: str = "auto"):
        """loop: "auto" (native where it builds), "native" (an error where it does not) or "python"."""
        super().__init__()
        pte, tok_path = resolve(path)
        # XNNPACK runs on ExecuTorch's shared threadpool: sized here for the process (or started at its
        # default), so its start-up log falls under the quiet CLI rather than into the first forward.
        pool = require("executorch.extension.pybindings.portable_lib", "executorch", "the executorch runtime")
        with native_log.muted_stderr():
            pool._unsafe_reset_threadpool(threads) if threads else pool._threadpool_get_thread_count()
        meta = _check_interface(pte, _load_program(pte))
        self._forward = meta.pop("forward")
        self.metadata = meta
        self.context_length = int(meta["get_max_context_len"])
        self.max_seq_len = int(meta["get_max_seq_len"])
        self.tokenizer = Tokenizer.from_file(tok_path)
        vocab = int(meta.get("get_vocab_size", self.tokenizer.vocab_size))
        if self.tokenizer.vocab_size > vocab:
            raise NimaError(f"{tok_path} has {self.tokenizer.vocab_size} tokens but {pte} only {vocab}",
                            "the tokenizer.json belongs to another model; " + REEXPORT)
        self._native, self.loop = None, "python"
        if loop != "python":
            lib, why = executorch_native.library()
            if lib is not None:
                logits = int(self._forward.metadata.output_tensor_meta(0).sizes()[-1])
                self._native, self.loop = executorch_native.NativeForward(lib, pte, logits), "native"
            elif loop == "native":
                raise NimaError(f"ExecuTorch's native loop is unavailable: {why}", "use loop=\"python\"")
            else:
                self.loop = f"python ({why})"

    def _run(self, ids: Sequence[int], start: int) -> np.ndarray:
        if self._native is not None:
            return self._native(ids, start)
        tokens = torch.tensor([list(ids)], dtype=torch.long)
        return self._forward.execute([tokens, torch.tensor([start], dtype=torch.long)])[0][0].numpy().copy()  # the output buffer is reused by the next call

    def _prefill(self, ids):
        ids = list(ids)
        for i in range(0, len(ids), self.max_seq_len):  # the program's largest single call
            logits = self._run(ids[i:i + self.max_seq_len], self.position + i)
        return logits

    def _decode(self, token_id):
        return self._run([token_id], self.position)

    def _reset(self):
        pass  # the custom SDPA attends only to positions < input_pos + T, so stale cache entries are unread

    def close(self) -> None:
        if self._native is not None:
            self._native.close()
            self._native = None
