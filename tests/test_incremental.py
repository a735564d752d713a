"""The batched incremental window state against float64 references: the
incrementally updated Gram, its spectra, and whole frame streams compared with
the reference per-request windows (`WindowTap`) under batching and chunking."""

import random

import numpy as np
import pytest
import torch

from eigenwatch.hooks.windows import BatchedWindowTap, WindowTap, finalize, seed_eigenvalues, seed_spectra
from eigenwatch.kernels.incremental import WindowBank, centre_gram, gram_eigvalsh


def ref_centred_eigs(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    xc = x - x.mean(0)
    return np.sort(np.linalg.eigvalsh(xc @ xc.T / x.shape[1]))[::-1].clip(0)


def report(got, want, rtol, atol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = np.argwhere(~np.isclose(got, want, rtol=rtol, atol=atol))
    return "; ".join(f"{tuple(i)}: got {got[tuple(i)]:.6g} want {want[tuple(i)]:.6g}" for i in bad[:5])


def test_incremental_gram_equals_from_scratch_after_10000_updates():
    w, d = 32, 48
    bank = WindowBank(w, d, max_slots=4, initial_slots=4)
    g = torch.Generator().manual_seed(0)
    slots = [0, 1, 2]
    history = {s: [] for s in slots}
    for t in range(10_000):
        rows = torch.randn(len(slots), d, generator=g) + 5.0  # a large common mean, as hidden states have
        bank.append(slots, rows)
        for i, s in enumerate(slots):
            history[s].append(rows[i].numpy())
    for s in slots:
        ring = bank.ring[s].double()
        scratch = ring @ ring.T
        rel = (bank.gram[s].double() - scratch).norm() / scratch.norm()
        assert rel <= 1e-5, f"slot {s}: relative error {rel:.2e} after 10,000 updates"
        last = np.stack(history[s][-w:])
        eigs = gram_eigvalsh(bank.gram[s : s + 1], w, d)[0].numpy()
        want = ref_centred_eigs(last)
        assert np.allclose(eigs, want, rtol=1e-4, atol=1e-6 * want[0]), report(eigs, want, 1e-4, 1e-6 * want[0])


@pytest.mark.parametrize("w, d", [(2, 1), (3, 7), (31, 100), (64, 33)])
def test_centre_gram_partial_windows(w, d):
    rng = np.random.default_rng(w * 100 + d)
    for valid in sorted({2, max(2, w // 2), w}):
        rows = rng.standard_normal((valid, d)) * 3 + 1
        gram = np.zeros((w, w))
        gram[:valid, :valid] = rows @ rows.T
        eigs = gram_eigvalsh(torch.tensor(gram[None]), valid, d)[0].numpy()
        want = np.zeros(w)
        want[:valid] = ref_centred_eigs(rows)
        assert np.allclose(eigs, want, rtol=1e-9, atol=1e-9), report(eigs, want, 1e-9, 1e-9)
        c = centre_gram(torch.tensor(gram[None]), valid)[0].numpy()
        assert np.allclose(c[valid:], 0) and np.allclose(c[:, valid:], 0)


def run_reference(streams, w, s):
    seeds = []
    tap = WindowTap(w, s, 64, seeds.append)
    for rid, rows in streams.items():
        tap.begin(rid)
        tap.add_rows(rid, 0, torch.tensor(rows, dtype=torch.float32), step=0)
        tap.finish(rid, step=1)
    return {(x.engine_request_id, x.token_count, x.final): finalize(x, "m") for x in seeds}


@pytest.mark.parametrize("w, s, proj", [(8, 4, None), (16, 5, None), (5, 3, None), (32, 16, None)])
def test_batched_frames_equal_reference_frames_under_batching_and_chunking(w, s, proj):
    rng = random.Random(w * 31 + s)
    d = 24
    lengths = {f"r{i}": rng.randint(1, 90) for i in range(7)}
    streams = {rid: np.random.default_rng(i).standard_normal((n, d)).astype(np.float32) * 2 + 3
               for i, (rid, n) in enumerate(lengths.items())}
    want = run_reference(streams, w, s)

    seeds = []
    tap = BatchedWindowTap(w, s, 4, seeds.append, proj_dim=proj)  # 4 slots for 7 requests: slots are reused
    pending = list(streams)
    active, done = {}, set()
    step = 0
    while pending or active:
        while pending and len(active) < 4:
            rid = pending.pop()
            assert tap.begin(rid)
            active[rid] = 0
        # One engine step: each active request contributes a chunk (1 row mostly, sometimes many).
        parts, items, n = [], [], 0
        for rid, pos in list(active.items()):
            k = 1 if rng.random() < 0.7 else rng.randint(2, 40)
            chunk = streams[rid][pos : pos + k]
            parts.append(chunk)
            items.append((rid, n, n + len(chunk)))
            n += len(chunk)
            active[rid] = pos + len(chunk)
        step += 1
        tap.add_layer(0, torch.tensor(np.concatenate(parts)), items, step)
        for rid, pos in list(active.items()):
            if pos >= len(streams[rid]):
                tap.finish(rid, step)
                del active[rid]
    got = {}
    for seed, spectrum in zip(seeds, seed_spectra(seeds)):
        got[(seed.engine_request_id, seed.token_count, seed.final)] = finalize(seed, "m", spectrum)
    assert set(got) == set(want)
    for key, ref in want.items():
        frame = got[key]
        assert frame.window == ref.window and frame.dim == ref.dim
        tol = 1e-4 * max(ref.eigenvalues[0], 1e-6)
        assert np.allclose(frame.eigenvalues, ref.eigenvalues, rtol=1e-4, atol=tol), (key, report(frame.eigenvalues, ref.eigenvalues, 1e-4, tol))
        assert np.allclose(frame.descriptors, ref.descriptors, rtol=1e-3, atol=1e-6), key


def test_projection_keeps_noise_scale_and_sets_gamma():
    w, d, k = 32, 1024, 128
    bank = WindowBank(w, d, proj_dim=k, max_slots=1, initial_slots=1)
    g = torch.Generator().manual_seed(1)
    bank.append([0], torch.randn(1, d, generator=g) * 0)  # reference row at the origin
    for _ in range(w):
        bank.append([0], torch.randn(1, d, generator=g) * 1.5)
    eigs = gram_eigvalsh(*bank.window_gram([0]), d)[0].numpy()
    # Noise of variance 2.25 seen through the projection: mean eigenvalue of the centred Gram / d
    # stays ≈ σ² (trace is preserved in expectation), MP ratio is now (W−1)/k.
    assert 1.8 < eigs[: w - 1].mean() < 2.7
    assert bank.k == k


def test_slots_join_and_leave_without_touching_others_and_capacity_grows():
    bank = WindowBank(4, 3, max_slots=64, initial_slots=2)
    a, b = bank.alloc(), bank.alloc()
    bank.append([a, b], torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    snapshot = bank.gram[a].clone()
    more = [bank.alloc() for _ in range(10)]  # grows 2 -> 4 -> 8 -> 16
    assert bank.capacity == 16 and len(set(more)) == 10 and a not in more and b not in more
    assert torch.equal(bank.gram[a], snapshot)
    bank.release(b)
    assert bank.alloc() == b and bank.count[b] == 0
    full = WindowBank(4, 3, max_slots=2, initial_slots=2)
    assert full.alloc() is not None and full.alloc() is not None and full.alloc() is None


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="window"):
        WindowBank(1, 4)
    with pytest.raises(ValueError, match="proj_dim"):
        WindowBank(4, 4, proj_dim=8)
    with pytest.raises(ValueError, match="dim"):
        WindowBank(4, 0)


def test_nan_rows_make_only_their_frame_invalid():
    seeds = []
    tap = BatchedWindowTap(4, 2, 8, seeds.append)
    tap.begin("ok")
    tap.begin("bad")
    rows = torch.randn(8, 6)
    rows[5, 2] = float("nan")
    tap.add_layer(0, rows, [("ok", 0, 4), ("bad", 4, 8)], step=1)
    eigs = seed_eigenvalues(seeds)
    by = {(s.engine_request_id, s.token_count): e for s, e in zip(seeds, eigs)}
    assert by[("ok", 2)] is not None and by[("ok", 4)] is not None
    assert by[("bad", 4)] is None  # dropped (and counted) by the exporter, never a NaN descriptor


def test_triton_backend_matches_torch_under_the_interpreter(tmp_path):
    """The same WindowBank stream through the Triton gram_update (interpreted
    on CPU, a fresh process so TRITON_INTERPRET is set before triton loads)
    and through torch."""
    import subprocess
    import sys

    pytest.importorskip("triton", reason="triton is not installed")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from eigenwatch.kernels.incremental import WindowBank\n"
        "g = torch.Generator().manual_seed(0)\n"
        "bank = WindowBank(8, 20, max_slots=8, initial_slots=8)\n"
        "assert bank.triton == (sys.argv[1] == 'triton'), bank.triton\n"
        "for t in range(30):\n"
        "    bank.append([0, 3, 5], torch.randn(3, 20, generator=g) + 2)\n"
        "torch.save({'gram': bank.gram, 'ring': bank.ring}, sys.argv[2])\n"
    )
    out = {}
    for name, env in (("torch", {"EIGENWATCH_BACKEND": "torch"}),
                      ("triton", {"EIGENWATCH_BACKEND": "triton", "TRITON_INTERPRET": "1"})):
        import os

        path = tmp_path / f"{name}.pt"
        proc = subprocess.run([sys.executable, str(script), name, str(path)], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[name] = torch.load(path)
    assert torch.equal(out["torch"]["ring"], out["triton"]["ring"])
    diff = (out["torch"]["gram"] - out["triton"]["gram"]).abs().max() / out["torch"]["gram"].abs().max()
    assert diff <= 1e-5, diff


def test_backend_choice_errors(monkeypatch):
    from eigenwatch.kernels import backend

    monkeypatch.setenv("EIGENWATCH_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="EIGENWATCH_BACKEND: expected one of auto, torch, triton"):
        backend.requested()
    monkeypatch.setenv("EIGENWATCH_BACKEND", "auto")
    assert not backend.use_triton(torch.device("cpu"))  # auto: torch on CPU, quietly
