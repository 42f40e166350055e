import numpy as np
import pytest

from nima_edge.errors import NimaError
from nima_edge.sampling import Sampling, choose


def test_greedy_takes_the_argmax():
    assert choose(np.array([0.1, 3.0, 2.0]), Sampling(), np.random.default_rng()) == 1


def test_top_k_and_top_p_restrict_the_choice():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    assert {choose(logits, Sampling(temperature=1.0, top_k=2), rng) for _ in range(300)} == {0, 1}
    assert {choose(logits, Sampling(temperature=1.0, top_p=0.7), rng) for _ in range(300)} == {0, 1}
    assert {choose(logits, Sampling(temperature=1.0, top_p=0.1), rng) for _ in range(50)} == {0}


def test_seeded_sampling_repeats():
    logits = np.zeros(50)
    draw = lambda: [choose(logits, s, r) for s in [Sampling(temperature=1.0, seed=3)] for r in [s.rng()] for _ in range(20)]
    assert draw() == draw()


def test_bad_sampling_settings():
    with pytest.raises(NimaError):
        Sampling(temperature=-1)
    with pytest.raises(NimaError):
        Sampling(top_p=0)


def test_torch_runtime_streams_and_matches_full_forward(tiny_ckpt):
    import torch
    from nima_edge.runtimes import load_runtime
    rt = load_runtime(tiny_ckpt)
    assert rt.target == "torch"
    prompt = rt.tokenize("ROMEO:\n")
    ids = list(prompt) + list(rt.generate_ids(prompt, 30))
    assert len(ids) == len(prompt) + 30
    with torch.no_grad():
        full = rt.model(torch.tensor([ids]))[0]
    # greedy choices made through the KV cache agree with the full forward pass
    assert full[len(prompt) - 1:-1].argmax(-1).tolist() == ids[len(prompt):]
    text = "".join(rt.generate("ROMEO:\n", 30))
    assert text == rt.detokenize(ids[len(prompt):])


def test_prompt_longer_than_context_is_refused(tiny_ckpt):
    from nima_edge.runtimes import load_runtime
    rt = load_runtime(tiny_ckpt)
    with pytest.raises(NimaError, match="exceeds the context"):
        rt.prefill([0] * (rt.context_length + 1))
    rt.reset()
    rt.prefill([0] * (rt.context_length - 2))
    assert len(list(rt.generate_ids([0] * (rt.context_length - 2), 50))) == 2  # prompt + output fill the context exactly


def test_unknown_artifact(tmp_path):
    from nima_edge.runtimes import load_runtime
    with pytest.raises(NimaError, match="does not exist"):
        load_runtime(tmp_path / "nothing.bin")
    (tmp_path / "x.bin").write_bytes(b"??")
    with pytest.raises(NimaError, match="cannot tell which runtime"):
        load_runtime(tmp_path / "x.bin")
