"""What a nima-edge GGUF holds beyond llama.cpp's own keys (shared by export/gguf*.py and runtimes/gguf.py)."""
SUFFIX = ".gguf"
TOKENIZER_JSON_KEY = "nima.tokenizer.json"  # the exact tokenizer.json, so every runtime tokenizes alike
TOKENIZER_SETTINGS_KEY = "nima.tokenizer.settings"  # Tokenizer.settings_json(): special tokens, end ids, template
