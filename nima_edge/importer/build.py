"""The imported weights into our model: the one place both importers end."""
from __future__ import annotations

from pathlib import Path

import torch

from nima_edge.config import ModelConfig
from nima_edge.errors import NimaError
from nima_edge.model import NimaForCausalLM

# buffers some transformers versions saved alongside the weights; recomputed from the config here
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: Path) -> NimaForCausalLM:
    """Our model holding exactly `weights` (float32); any missing, unexpected or misshapen tensor is an error."""
    weights = {k: v for k, v in weights.items() if not k.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # tied: the embedding is the head
    model = NimaForCausalLM(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        hint = ("it has biases, which nima-edge's model does not carry"
                if any(k.endswith(".bias") for k in unexpected) else "the weights do not match the config")
        raise NimaError(f"{source}: {len(missing)} tensor(s) missing (e.g. {missing[:2]}), {len(unexpected)} "
                        f"unexpected (e.g. {unexpected[:2]}): {hint}",
                        "import a plain LlamaForCausalLM (no extra heads, adapters merged)")
    params = model.state_dict()
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise NimaError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config implies "
                            f"{tuple(params[name].shape)}", "the weights and config.json come from different models")
    model.load_state_dict(weights, strict=False)
    return model.eval()
