import pytest
import torch

from nima_edge.config import ModelConfig, preset
from nima_edge.errors import NimaError
from nima_edge.model import KVCache, NimaForCausalLM


@pytest.mark.parametrize("name,approx", [("nima-0.5m", 0.53e6), ("nima-1m", 1.02e6), ("nima-5m", 4.79e6),
                                         ("nima-10m", 10.6e6)])
def test_presets_sizes_and_quantization_friendly_widths(name, approx):
    cfg = preset(name, vocab_size=262)
    n = NimaForCausalLM(cfg).num_parameters()
    assert abs(n - approx) / approx < 0.01
    for width in (cfg.hidden_size, cfg.intermediate_size):
        assert width % 128 == 0  # Q4_0/Q8_0 (32), MatMulNBits (32), block-128 DequantizeLinear
        if name in ("nima-5m", "nima-10m"):
            assert width % 256 == 0  # llama.cpp K-quant super-blocks


def test_unknown_preset_and_bad_shapes():
    with pytest.raises(NimaError, match="unknown preset"):
        preset("nima-7b", vocab_size=262)
    with pytest.raises(NimaError, match="not a multiple"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3).validate()


@pytest.mark.parametrize("tied,kv_heads", [(True, 2), (False, 4), (True, 1)])
def test_kv_cache_decode_equals_full_forward(tied, kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=262, num_key_value_heads=kv_heads, tie_word_embeddings=tied, max_position_embeddings=64)
    model = NimaForCausalLM(cfg).eval()
    ids = torch.randint(0, 262, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg, batch=2)
        steps = [model(ids[:, :7], cache=cache, start_pos=0)]
        steps += [model(ids[:, t:t + 1], cache=cache, start_pos=t) for t in range(7, 40)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_context_overflow_is_refused():
    model = NimaForCausalLM(ModelConfig(max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tied_embeddings_share_storage():
    model = NimaForCausalLM(ModelConfig(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_hf_transformers_gives_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nima_edge import checkpoint
    from nima_edge.tokenizer import train_tokenizer
    torch.manual_seed(0)
    for tied in (True, False):
        cfg = ModelConfig(vocab_size=262, tie_word_embeddings=tied, num_key_value_heads=2)
        model = NimaForCausalLM(cfg).eval()
        checkpoint.save(tmp_path / f"ck{tied}", model, train_tokenizer("char"))
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / f"ck{tied}").eval()
        ids = torch.randint(0, 262, (2, 50))
        with torch.no_grad():
            assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-5


# --- Llama configurations of published small models (random weights, layers shrunk) --------------------

HF_CONFIGS = {
    # SmolLM2-135M: width 576, 9 heads / 3 KV heads, head_dim 64, tied (vocabulary shrunk from 49152)
    "smollm2": dict(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192),
    # TinyLlama-1.1B: untied, 4 KV heads, its 32000-token vocabulary (width shrunk from 2048)
    "tinyllama": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                      num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=2048),
    # Llama-3.2: rope_scaling llama3, untied, 128K vocabulary and positions; head_dim 64 != 128 / 4
    "llama3.2": dict(vocab_size=128256, hidden_size=128, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, rope_theta=500000.0,
                     rms_norm_eps=1e-5, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # HF Llama's optional biases, linear RoPE scaling and an unusual eps
    "biased-linear": dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
                          max_position_embeddings=4096, attention_bias=True, mlp_bias=True,
                          rope_scaling={"type": "linear", "factor": 4.0}),
}


def hf_model(name: str, layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, **HF_CONFIGS[name])
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the test see them
        for n, p in hf.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return hf


def ours_from(hf) -> NimaForCausalLM:
    model = NimaForCausalLM(ModelConfig.from_hf(hf.config.to_dict())).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_published_llama_configs_match_transformers(name):
    hf = hf_model(name)
    model = ours_from(hf)
    cfg = model.config
    spec = HF_CONFIGS[name]
    assert cfg.head_dim == spec.get("head_dim", spec["hidden_size"] // spec["num_attention_heads"])
    assert cfg.tie_word_embeddings == spec["tie_word_embeddings"]
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == cfg.tie_word_embeddings
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model(ids) - ref).abs().max().item() < 1e-5  # prefill
        cache = KVCache(cfg, batch=2)
        steps = [model(ids[:, :9], cache=cache, start_pos=0)]
        steps += [model(ids[:, t:t + 1], cache=cache, start_pos=t) for t in range(9, 24)]
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() < 1e-5  # KV-cache decode
    if cfg.max_position_embeddings > 5024:  # far positions, where llama3 scaling changes the frequencies
        far = torch.arange(5000, 5024)[None]
        with torch.no_grad():
            hf_far = hf(ids[:1], position_ids=far).logits
            ours_far = model.lm_head(model.hidden_states(ids[:1], far))
        assert (ours_far - hf_far).abs().max().item() < 1e-5


def test_big_context_allocates_nothing_per_position():
    hf = hf_model("llama3.2", layers=1)
    model = ours_from(hf)
    assert model.config.max_position_embeddings == 131072
    assert all(b.numel() < 1000 for b in model.buffers())  # only inv_freq; no [131072, head_dim] tables
    cache = KVCache(model.config)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert cache[0].k.shape[2] == 256  # grows with the positions used, up to the declared context
    assert cache.max_len == 131072


def test_both_config_layouts_read_the_same():
    v4 = {"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 256, "num_hidden_layers": 1, "vocab_size": 300, "max_position_embeddings": 4096,
          "rope_theta": 500000.0, "head_dim": 64,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 1024}}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    a, b = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["factor"] == 8.0 and a.head_dim == 64
    plain = ModelConfig.from_hf({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    assert ModelConfig.from_hf(a.to_hf()) == a  # what we write reads back (both layouts in one file)


@pytest.mark.parametrize("config,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling of type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs a positive number low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": 130, "num_attention_heads": 4}, "not divisible by num_attention_heads"),
])
def test_unsupported_llama_configs_are_refused_clearly(config, match):
    with pytest.raises(NimaError, match=match):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 300, **config})


def test_our_checkpoint_with_new_fields_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nima_edge import checkpoint
    from nima_edge.tokenizer import train_tokenizer
    torch.manual_seed(0)
    hf = hf_model("biased-linear")
    model = ours_from(hf)
    path = checkpoint.save(tmp_path / "ck", model, train_tokenizer("char"))
    back = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 262, (1, 20))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() < 1e-5
    again, _ = checkpoint.load(path)
    assert again.config == model.config
