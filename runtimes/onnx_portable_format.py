"""The portable ONNX file's interface: optimum's past/present names and nima-edge's metadata keys
(shared by export/onnx_portable.py and runtimes/onnx_portable.py)."""
SUFFIX = ".onnx"
META_TOKENIZER, META_CONFIG, META_QUANT = "nima.tokenizer", "nima.config", "nima.quant"
META_TOKENIZER_SETTINGS = "nima.tokenizer.settings"  # Tokenizer.settings_json()


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]
