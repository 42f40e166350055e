"""Random-weight Hugging Face Llama models shaped like public small models, for the import tests.

Each is written the way `huggingface-cli download` leaves a model: config.json and safetensors from
transformers' save_pretrained, a tokenizer.json of the model's kind trained on the test corpus, and
tokenizer_config.json / generation_config.json / chat_template.jinja with the model's own special
tokens and chat template. Layers (and, for the 1B-class ones, widths) are shrunk for speed; what the
importer and exporters must handle is kept: head_dim, grouped KV heads, tied or untied embeddings,
rope_scaling llama3, the tokenizer kind, the template, fp32/bf16/fp16 and sharded weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPACE = "▁"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# SmolLM2-135M-Instruct's template (ChatML with a default system prompt)
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# TinyLlama-1.1B-Chat-v1.0's template (Zephyr style; <|user|> etc. are plain text there)
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# Meta-Llama-3-Instruct's template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

SPECS = {
    # SmolLM2-135M: width 576, 9 heads / 3 KV heads, head_dim 64, tied, byte-level BPE (digits split)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                    dtype="float32", shard="8MB"),
    # TinyLlama-1.1B (width shrunk 2048 -> 512): 4 KV heads, untied, SentencePiece-style BPE, bf16 weights
    "tinyllama": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4,
                      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5, dtype="bfloat16"),
    # Llama-3.2-1B (width shrunk 2048 -> 512): rope_scaling llama3, untied, Llama-3 BPE, fp16 weights
    "llama32": dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                    head_dim=64, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    dtype="float16", context=8192),  # transformers wants it >= the original context
}
LAYERS, CONTEXT = 2, 1024


def _byte_level(corpus: list[str], vocab: int, specials: list[str], pre) -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer=trainer)
    return tk


def smollm_tokenizer(corpus: list[str], vocab: int) -> Tokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk = _byte_level(corpus, vocab, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]))
    tk.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS, as SmolLM2's
    return tk


def llama3_tokenizer(corpus: list[str], vocab: int) -> Tokenizer:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk = _byte_level(corpus, vocab, specials, pre)
    tk.model = models.BPE(**_bpe_parts(tk), ignore_merges=True)  # Llama-3's tokenizer.json sets it
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tk.token_to_id("<|begin_of_text|>"))])
    return tk


def _bpe_parts(tk: Tokenizer) -> dict:
    model = json.loads(tk.to_str())["model"]
    return {"vocab": model["vocab"], "merges": [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
                                                for m in model["merges"]]}


def tinyllama_tokenizer(corpus: list[str], vocab: int) -> Tokenizer:
    """Llama-2 style: <unk> <s> </s>, 256 byte tokens <0x00>..<0xFF>, then pieces with "▁" for spaces
    (trained split at spaces, as SentencePiece does), BPE with byte fallback, BOS prepended."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials + byte_tokens, show_progress=False,
                                  limit_alphabet=200)
    tk.train_from_iterator(corpus, trainer=trainer)
    tj = json.loads(tk.to_str())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] in specials]  # bytes are vocab, not added
    tk = Tokenizer.from_str(json.dumps(tj))
    tk.pre_tokenizer = None  # as Llama-2's tokenizer.json: the normalizer handles spaces, no splitting
    tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return tk


def write_model(kind: str, corpus: list[str], out: Path, vocab: int = 768, seed: int = 0, layers: int = LAYERS,
                context: int = CONTEXT, rows: int | None = None) -> Path:
    """A Hugging Face model directory of `kind` (a key of SPECS) with random weights; `rows` pads the
    embedding past the tokenizer (SmolLM2's 49152 rows), as published models often do."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(SPECS[kind])
    dtype, shard, context = spec.pop("dtype"), spec.pop("shard", None), spec.pop("context", context)
    if kind == "smollm2":
        tk = smollm_tokenizer(corpus, vocab)
        bos, eos, pad, template, eos_ids = "<|im_start|>", "<|im_end|>", "<|im_end|>", SMOLLM_TEMPLATE, None
    elif kind == "tinyllama":
        tk = tinyllama_tokenizer(corpus, vocab)
        bos, eos, pad, template, eos_ids = "<s>", "</s>", "</s>", TINYLLAMA_TEMPLATE, None
    else:
        tk = llama3_tokenizer(corpus, vocab)
        bos, eos, pad, template = "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3_TEMPLATE
        eos_ids = [tk.token_to_id("<|end_of_text|>"), tk.token_to_id("<|eot_id|>")]
    n_vocab = tk.get_vocab_size(with_added_tokens=True)
    eos_id = tk.token_to_id(eos)
    cfg = LlamaConfig(vocab_size=max(n_vocab, rows or 0), num_hidden_layers=layers, max_position_embeddings=context,
                      bos_token_id=tk.token_to_id(bos), eos_token_id=eos_ids or eos_id,
                      pad_token_id=tk.token_to_id(pad) if pad else None, initializer_range=0.05, **spec)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=shard or "2GB")
    tk.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
              "model_max_length": context, "clean_up_tokenization_spaces": False}
    if kind == "llama32":  # transformers 5 layout: the template in its own file
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:  # transformers 4 layout: inside tokenizer_config.json
        config["chat_template"] = template
    if kind == "tinyllama":
        config["unk_token"] = "<unk>"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
