"""The window state and the one centred-Gram spectrum against float64
references (tests/reference.py): kernels/window_bank.py (the ring, the
batched centred Grams, slots, projection), kernels/gram.py (batched spectra
on awkward shapes) and the backend choice."""

import numpy as np
import pytest
import torch

from eigenwatch.kernels.gram import centre, spectra
from eigenwatch.kernels.window_bank import Slots, WindowBank

import reference


def report(got, want, rtol, atol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = np.argwhere(~np.isclose(got, want, rtol=rtol, atol=atol))
    return "; ".join(f"{tuple(i)}: got {got[tuple(i)]:.6g} want {want[tuple(i)]:.6g}" for i in bad[:5])


def test_window_after_10000_appends_matches_the_float64_window():
    """10,000 decode rows per slot (a large common mean, as hidden states have):
    the ring holds exactly the last W rows, and the centred Grams and spectra of
    `window_gram` match float64 references of those rows."""
    w, d = 32, 48
    bank = WindowBank(w, d, max_slots=4, initial_slots=4)
    g = torch.Generator().manual_seed(0)
    slots = [0, 1, 2]
    history = {s: [] for s in slots}
    for t in range(10_000):
        rows = torch.randn(len(slots), d, generator=g) + 5.0
        bank.append(slots, rows)
        for i, s in enumerate(slots):
            history[s].append(rows[i].numpy())
    grams, valid = bank.window_gram(slots)
    assert valid == [w] * 3
    for i, s in enumerate(slots):
        last = np.stack(history[s][-w:])
        # ring position t % W holds row t
        order = [(10_000 - w + j) % w for j in range(w)]
        assert torch.equal(bank.ring[s][order], torch.from_numpy(last))
        want_g = reference.centred_gram(last[np.argsort(order)]) * d
        rel = np.linalg.norm(grams[i].double().numpy() - want_g) / np.linalg.norm(want_g)
        assert rel <= 1e-6, f"slot {s}: centred Gram relative error {rel:.2e}"
        eigs = spectra(grams[i : i + 1], w, 1.0 / d)[0][0].numpy()
        want = reference.window_eigenvalues(last)
        assert np.allclose(eigs, want, rtol=1e-5, atol=1e-6 * want[0]), report(eigs, want, 1e-5, 1e-6 * want[0])


@pytest.mark.parametrize("w, d", [(2, 1), (3, 7), (31, 100), (64, 33), (17, 1023)])
def test_spectra_of_partial_windows_in_one_batch(w, d):
    """Windows of every fill level in one call, each with its own scale, against
    the float64 eigenvalues of its centred rows; entries outside each valid block
    (a reused slot's stale rows, NaN included) are never read."""
    rng = np.random.default_rng(w * 100 + d)
    valid = sorted({1, 2, max(2, w // 2), w})
    grams = np.full((len(valid), w, w), np.nan)
    rows = []
    for b, v in enumerate(valid):
        x = rng.standard_normal((v, d)) * 3 + 1
        rows.append(x)
        grams[b, :v, :v] = x @ x.T
    scale = np.array([1.0 / d, 2.0 / d, 0.5, 1.0][: len(valid)])
    eigs, row_sq, ok = spectra(torch.tensor(grams), torch.tensor(valid), torch.tensor(scale))
    assert ok.all()
    for b, v in enumerate(valid):
        want = reference.centred_block_eigvalsh(grams[b], v, 1.0 / scale[b], w)
        assert np.allclose(eigs[b].numpy(), want, rtol=1e-9, atol=1e-9 * max(want[0], 1e-300)), \
            report(eigs[b].numpy(), want, 1e-9, 1e-9)
        if v >= 2:
            want_rows = reference.window_spectrum(rows[b])[1] * d * scale[b]
            np.testing.assert_allclose(row_sq[b, :v].numpy(), want_rows, rtol=1e-9, atol=1e-12)
        assert not row_sq[b, v:].any()
        c = centre(torch.tensor(grams[b : b + 1]), torch.tensor([v]))[0].numpy()
        assert not c[v:].any() and not c[:, v:].any()


def test_spectra_flag_nan_windows_without_touching_the_others():
    g = torch.randn(3, 4, 6, dtype=torch.float64)
    grams = g @ g.transpose(1, 2)
    grams[1, 2, 0] = float("inf")
    eigs, _, ok = spectra(grams, 4, 1.0 / 6)
    assert ok.tolist() == [True, False, True]
    assert not eigs[1].any()
    for b in (0, 2):
        want = reference.window_eigenvalues(g[b].double().numpy())
        np.testing.assert_allclose(eigs[b].numpy(), want, rtol=1e-9, atol=1e-12)


def test_projection_keeps_noise_scale_and_sets_gamma():
    w, d, k = 32, 1024, 128
    bank = WindowBank(w, d, proj_dim=k, max_slots=1, initial_slots=1)
    g = torch.Generator().manual_seed(1)
    bank.append([0], torch.randn(1, d, generator=g) * 0)  # reference row at the origin
    for _ in range(w):
        bank.append([0], torch.randn(1, d, generator=g) * 1.5)
    grams, valid = bank.window_gram([0])
    eigs = spectra(grams, valid, 1.0 / d)[0][0].numpy()
    # Noise of variance 2.25 seen through the projection: mean eigenvalue of the centred Gram / d
    # stays ≈ σ² (trace is preserved in expectation), MP ratio is now (W−1)/k.
    assert 1.8 < eigs[: w - 1].mean() < 2.7
    assert bank.k == k


def test_slots_join_and_leave_without_touching_others_and_capacity_grows():
    slots = Slots(64)
    bank = WindowBank(4, 3, max_slots=64, initial_slots=2)
    a, b = slots.alloc(), slots.alloc()
    assert (a, b) == (0, 1)  # lowest numbers first: banks stay small
    bank.append([a, b], torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    snapshot = bank.ring[a].clone()
    more = [slots.alloc() for _ in range(10)]
    for s in more:
        bank.ensure(s)  # grows 2 -> 4 -> 8 -> 16
    assert bank.capacity == 16 and len(set(more)) == 10 and a not in more and b not in more
    assert torch.equal(bank.ring[a], snapshot) and bank.rows_in(a) == 1
    slots.release(b)
    bank.reset(b)
    assert slots.alloc() == b and bank.rows_in(b) == 0
    assert slots.in_use() == 12
    full = Slots(2)
    assert full.alloc() is not None and full.alloc() is not None and full.alloc() is None
    with pytest.raises(ValueError, match="slot"):
        bank.ensure(64)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="window"):
        WindowBank(1, 4)
    with pytest.raises(ValueError, match="proj_dim"):
        WindowBank(4, 4, proj_dim=8)
    with pytest.raises(ValueError, match="dim"):
        WindowBank(4, 0)
    with pytest.raises(ValueError, match="max_slots"):
        Slots(0)
    with pytest.raises(ValueError, match="gram"):
        spectra(torch.zeros(2, 3, 4), 2, 1.0)


def test_backend_choice_errors(monkeypatch):
    from eigenwatch.kernels import backend

    monkeypatch.setenv("EIGENWATCH_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="EIGENWATCH_BACKEND: expected one of auto, torch, triton"):
        backend.requested()
    monkeypatch.setenv("EIGENWATCH_BACKEND", "auto")
    assert not backend.use_triton(torch.device("cpu"))  # auto: torch on CPU, quietly


@pytest.mark.parametrize("path", ["prefill", "decode", "chunks"])
@pytest.mark.parametrize("proj", [None, 24])
def test_windows_far_from_the_first_row_keep_their_precision(path, proj):
    """A request whose first row is far from the rest (BOS with massive
    activations) and whose later rows barely differ (one word repeated): the
    fp32 window state must still resolve the later windows' small spread."""
    w, d = 8, 64
    g = torch.Generator().manual_seed(3)
    base = torch.randn(d, generator=g) * 5
    rows = base + 1e-3 * torch.randn(40, d, generator=g, dtype=torch.float64).float()
    rows[0] = 1000.0 * torch.randn(d, generator=g)  # the outlier first row
    bank = WindowBank(w, d, proj_dim=proj, max_slots=1, initial_slots=1)
    if path == "prefill":
        bank.extend(0, rows, [])
    elif path == "decode":
        for r in rows:
            bank.append([0], r[None])
    else:
        for lo in range(0, 40, 7):
            bank.extend(0, rows[lo : lo + 7], []) if lo % 2 else [bank.append([0], r[None]) for r in rows[lo : lo + 7]]
    grams, valid = bank.window_gram([0])
    eigs = spectra(grams, valid, 1.0 / d)[0][0].numpy()
    x = rows[-w:].double()
    if proj is not None:
        x = x @ bank.proj.double()
    want = reference.window_eigenvalues(x.numpy()) * x.shape[1] / d
    np.testing.assert_allclose(eigs, want, rtol=0, atol=1e-3 * want[0])
