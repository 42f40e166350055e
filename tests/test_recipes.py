"""The bundled recipes train the model that is shipped: every position its preset declares."""
import pytest

from nima_edge.config import PRESETS
from nima_edge.train import recipe


@pytest.mark.parametrize("name", recipe.bundled_recipes())
def test_bundled_recipes_train_every_declared_position(name):
    cfg = recipe.load(name)
    # chat, serve and every export use max_position_embeddings; a shorter window leaves positions untrained
    assert cfg.context == PRESETS[cfg.preset]["max_position_embeddings"]
