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
