"""The transformers tap reads the right rows: its frames (through the same
windows as the vLLM tap) equal float64 spectra computed from the model's own
`output_hidden_states`, window by window, and its token sums equal the rows'."""

import numpy as np
import pytest
import torch

from eigenwatch.hooks.hf import HFTap
from eigenwatch.hooks.models import build_tiny_llama
from eigenwatch.kernels.descriptors import describe

import reference


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_llama()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("n_tokens, window, stride", [(45, 16, 8), (7, 32, 16), (33, 5, 3)])
def test_hf_frames_match_hidden_states(tiny, n_tokens, window, stride):
    model, _ = tiny
    ids = torch.Generator().manual_seed(n_tokens)
    input_ids = torch.randint(3, 2000, (n_tokens,), generator=ids).tolist()
    tap = HFTap(model, window=window, stride=stride, model_name="tiny", capture=True)
    try:
        frames, sums = tap.run("req", input_ids)
    finally:
        tap.close()
    assert tap.layers == (1, 2, 3)
    with torch.inference_mode():
        hidden = model(torch.tensor([input_ids]), output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output; hidden_states[i + 1] is layer i's output.
    # The last entry has the final norm applied in transformers' Llama, so compare
    # layers below the last only through their own output.
    expected_counts = [t for t in range(stride, n_tokens + 1, stride) if t >= 2] + [n_tokens]
    for layer in tap.layers:
        mine = [f for f in frames if f.layer == layer]
        assert [f.token_count for f in mine] == expected_counts
        assert [f.final for f in mine] == [False] * (len(mine) - 1) + [True]
        if layer == model.config.num_hidden_layers - 1:
            continue  # transformers applies the final norm to the last hidden state
        rows = hidden[layer + 1][0].double().numpy()
        n, total, scatter = sums[layer]
        assert n == n_tokens
        np.testing.assert_allclose(total, rows.sum(0), rtol=1e-6, atol=1e-6 * np.abs(rows).max())
        np.testing.assert_allclose(scatter, rows.T @ rows, rtol=1e-6, atol=1e-6 * np.abs(rows.T @ rows).max())
        for f in mine:
            t = f.token_count
            win = rows[max(0, t - window):t]
            eigs, row_sq = reference.window_spectrum(win)
            # fp32 window Gram (as live): errors relative to the window's largest eigenvalue
            np.testing.assert_allclose(f.eigenvalues, eigs, rtol=0, atol=1e-4 * eigs[0])
            want = describe(eigs, win.shape[0], win.shape[1], row_sq_norms=row_sq)
            np.testing.assert_allclose(f.descriptors, want, rtol=2e-3, atol=1e-4)


def test_hf_tap_texts_and_removal(tiny):
    model, tok = tiny
    before = {i: dict(model.model.layers[i]._forward_hooks) for i in (0, 3)}
    tap = HFTap(model, layers=(0, -1), window=8, stride=4)
    assert all(len(model.model.layers[i]._forward_hooks) == len(before[i]) + 1 for i in (0, 3))
    out = {rid: tap.frames(rid, tok(text)["input_ids"])
           for rid, text in [("a", "The quick brown fox jumps over the lazy dog."), ("b", "Hello there")]}
    assert set(out) == {"a", "b"}
    assert {f.layer for f in out["a"]} == {0, 3}
    n_a = len(tok("The quick brown fox jumps over the lazy dog.")["input_ids"])
    assert max(f.token_count for f in out["a"]) == n_a
    tap.close()
    assert all(dict(model.model.layers[i]._forward_hooks) == before[i] for i in (0, 3))  # ours removed
