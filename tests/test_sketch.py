"""Streaming top-eigenvector sketches (kernels/sketch.py) against the float64 references in tests/reference.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402

from eigenwatch.kernels import sketch as sk  # noqa: E402
from eigenwatch.kernels.sketch import (  # noqa: E402
    FDConfig, FrequentDirections, HeavyLight, HeavyLightConfig, OjaGrid, OjaGridConfig, SketchFailure, StackedPower,
    leading_directions, principal_angle_degrees,
)

try:
    import torch
except ImportError:  # the numpy paths are still tested
    torch = None


def planted(d: int, n: int, top: float, seed: int, order: str = "random") -> np.ndarray:
    """Rows with population eigenvalues top, 1, 2^-1/2, 3^-1/2, ... in a random orthonormal basis;
    `sorted` presents them by decreasing |component along the top direction|."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    lam = np.concatenate([[top], 1.0 / np.sqrt(np.arange(1, d))])
    z = rng.standard_normal((n, d))
    if order == "sorted":
        z = z[np.argsort(-np.abs(z[:, 0]), kind="stable")]
    return (z * np.sqrt(lam)) @ q.T


def feed(sketch, x, step=200):
    for i in range(0, len(x), step):
        sketch.update(x[i:i + step])
    return sketch


def top(x, k=1):
    return reference.stream_top_eigvecs([x], k)[1]


def corr(v, u):
    v = np.asarray(v, dtype=np.float64)
    return abs(float(v @ u)) / np.linalg.norm(v)


MAKERS = {
    "oja_grid": lambda d: OjaGrid(d, holdout=128, dtype="float64"),
    "heavy_light": lambda d: HeavyLight(d, epoch0=256, shuffle=512, dtype="float64"),
    "fd": lambda d: FrequentDirections(d, ell=8, dtype="float64"),
}


# ---- recovery of a planted top direction ----

# fixed-η Oja on a stream sorted by its top component needs a larger gap than 4 at this length
# (Price–Xun's arbitrary-order bound grows with log n·log d); bench/bench_sketch.py shows where it holds.
@pytest.mark.parametrize("name,d,order", [(name, d, order) for name in sorted(MAKERS)
                                          for d, order in [(37, "random"), (64, "random"), (37, "sorted")]
                                          if not (name == "oja_grid" and order == "sorted")])
def test_recovers_planted_direction(name, d, order):
    x = planted(d, 5000, top=4.0, seed=d, order=order)
    v = feed(MAKERS[name](d), x).estimate()
    assert v.shape == (d,)
    assert abs(np.linalg.norm(v) - 1) < 1e-9
    assert corr(v, top(x)[:, 0]) >= 0.99


def test_frequent_directions_top_k_subspace():
    x = planted(37, 4000, top=6.0, seed=3)
    fd = feed(FrequentDirections(37, ell=12, dtype="float64"), x)
    v = fd.estimate(k=3)
    assert v.shape == (37, 3)
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-10)
    # the sketch's top-3 subspace captures the stream's energy up to the FD bound
    a2 = np.linalg.norm(x @ v) ** 2
    best = reference.stream_second_moment([x])
    opt = np.sort(np.linalg.eigvalsh(best))[::-1][:3].sum()
    assert opt - a2 <= 3 * fd.delta() + 1e-8 * opt


# ---- the closed-form Oja block against the per-row reference ----

@pytest.mark.parametrize("d,b", [(1, 5), (37, 1), (37, 7), (37, 129), (64, 64)])
def test_oja_block_matches_row_loop(d, b):
    rng = np.random.default_rng(d * 1000 + b)
    x = rng.standard_normal((b, d))
    v0 = rng.standard_normal(d)
    v0 /= np.linalg.norm(v0)
    etas = np.array([1e-4, 1e-3, 1e-2]) / d
    got = sk.oja_block(sk._NumpyOps(), np.tile(v0, (3, 1)), x, etas)
    for g, eta in enumerate(etas):
        want = reference.oja_fixed_eta(v0, x, eta)
        np.testing.assert_allclose(got[g], want, rtol=0, atol=1e-12)
    if torch is not None:
        tgot = sk.oja_block(sk._TorchOps("cpu"), torch.tensor(np.tile(v0, (3, 1))), torch.tensor(x), torch.tensor(etas))
        np.testing.assert_allclose(tgot.numpy(), got, rtol=0, atol=1e-12)


# ---- OjaGrid: failure on a too-heavy row ----

def test_oja_grid_reports_too_heavy_row():
    d = 37
    x = planted(d, 3000, top=4.0, seed=1)
    g = OjaGrid(d, holdout=64, tau=0.25, clip_ratio=None, dtype="float64")  # strict Price–Xun rule: no clipping
    g.update(x[:1000])
    scale = g.scale
    heavy = np.zeros((5, d))
    heavy[:, 0] = 1.0
    heavy *= np.sqrt(300 * scale)  # η‖a‖² = h·300: fails every h > 1/1200
    g.update(heavy)
    g.update(x[1000:])
    st_ = g.status()
    load_heavy = np.asarray(g.config.steps) * 300
    light_max = np.asarray(g.config.steps) / scale * (x[1000:] ** 2).sum(1).max()
    want = (load_heavy > 0.25) | (light_max > 0.25)
    assert want.any() and not want.all()
    assert st_["failed"] == want.tolist()
    assert all(n >= 1 for n, w in zip(st_["heavy_rows"], want) if w)
    assert not st_["failed"][g.selected()] and st_["selected"] == g.selected()
    assert st_["degraded"] == any(want[g.selected() + 1:])
    np.testing.assert_allclose(max(st_["max_load"]), load_heavy.max(), rtol=1e-12)


def test_oja_grid_raises_when_every_run_failed():
    d = 16
    g = OjaGrid(d, grid_min=1e-2, grid_size=3, holdout=8, row_scale=1.0, dtype="float64")
    g.update(np.random.default_rng(0).standard_normal((200, d)) * 10)  # η‖a‖² ≈ 16 > tau everywhere
    assert all(g.status()["failed"]) and g.status()["degraded"] and g.status()["selected"] is None
    with pytest.raises(SketchFailure, match="tau"):
        g.estimate()


def _burst_stream(d, n, seed):
    """planted(top=3) with 3 bursts of 5 rows along random directions, each 2% of ‖A‖_F² (below λ₂)."""
    x = planted(d, n, top=3.0, seed=seed)
    rng = np.random.default_rng(seed + 1)
    c2 = 0.02 * (x ** 2).sum() / 5
    for start in rng.choice(np.arange(500, n - 20), 3, replace=False):
        w = rng.standard_normal(d)
        x[start:start + 5] = np.sqrt(c2) * rng.choice([-1.0, 1.0], (5, 1)) * (w / np.linalg.norm(w))
    return x


def reservoir_slots(n, m, seed=0):
    """Algorithm R row by row on the sketch's row hash: -> [n] the slot each row ends in (−1: not admitted,
    or evicted since)."""
    t = np.arange(n, dtype=np.int64)
    ops = sk._NumpyOps()
    admit = sk._uniform(ops, t, seed, 1) * (t + 1) < m
    pick = np.minimum((sk._uniform(ops, t, seed, 2) * m).astype(np.int64), m - 1)
    holder, where = [-1] * m, np.full(n, -1)
    for i in range(n):
        if admit[i]:
            s = i if i < m else int(pick[i])
            if holder[s] >= 0:
                where[holder[s]] = -1
            holder[s], where[i] = i, s
    return where


def reservoir_feed(n, m, block, seed=0):
    """-> per block of `block` rows, the rows OjaGrid feeds to its runs there: the rows not admitted to the
    reservoir, and the rows evicted from it by a row of the block (Algorithm R row by row)."""
    t = np.arange(n, dtype=np.int64)
    ops = sk._NumpyOps()
    admit = sk._uniform(ops, t, seed, 1) * (t + 1) < m
    pick = np.minimum((sk._uniform(ops, t, seed, 2) * m).astype(np.int64), m - 1)
    holder, out = [-1] * m, []
    for b in range(0, n, block):
        fed = []
        for i in range(b, min(b + block, n)):
            if not admit[i]:
                fed.append(i)
                continue
            s = i if i < m else int(pick[i])
            if holder[s] >= 0:
                fed.append(holder[s])
            holder[s] = i
        out.append(sorted(fed))
    return out


def test_oja_grid_clips_heavy_rows_and_counts_what_it_left_out():
    d, n = 37, 6000
    x = _burst_stream(d, n, seed=3)
    u = top(x)[:, 0]
    g = feed(OjaGrid(d, holdout=128, dtype="float64", clip_ratio=8.0), x, 64)
    st_ = g.status()
    # float64 reference of the clipping rule: a fed row heavier than 8× the mean ‖a‖² of the rows fed before
    # its block enters scaled down to that energy; a row is fed in the block where it is not admitted to
    # the reservoir, or where a later row evicts it from there (Algorithm R on the row hash, row by row)
    m = 128
    blocks = reservoir_feed(n, m, block=64)
    sample = [i for i in range(n) if not any(i in blk for blk in blocks)]
    assert len(sample) == m and sum(len(blk) for blk in blocks) == n - m  # every other row reaches the runs
    n2 = (x ** 2).sum(1)
    left, rows, total, count = 0.0, 0, 0.0, 0
    for idx in blocks:
        cap = 8.0 * (total / count if count else g.scale)
        heavy = [i for i in idx if n2[i] > cap]
        left += sum(n2[i] - cap for i in heavy)
        rows += len(heavy)
        total += n2[idx].sum()
        count += len(idx)
    assert rows >= 12 and st_["clipped_rows"] == rows  # the 15 burst rows, less any held back
    assert st_["clipped_energy"] == pytest.approx(left, rel=1e-9)
    assert st_["fed_energy"] == pytest.approx(n2.sum() - n2[sample].sum(), rel=1e-12)
    np.testing.assert_array_equal(np.asarray(g.holdout[:m]), x[sample][np.argsort(reservoir_slots(n, m)[sample])])
    assert not any(st_["failed"])
    assert corr(g.estimate(), u) >= 0.99
    # without clipping the same grid has to fail its larger steps on the burst rows
    strict = feed(OjaGrid(d, holdout=128, dtype="float64", clip_ratio=None), x, 64).status()
    assert any(strict["failed"]) and strict["clipped_rows"] == 0


def test_oja_grid_tail_average_is_the_mean_of_the_last_half_of_block_iterates():
    d, b = 13, 16
    x = planted(d, 16 * 37, top=4.0, seed=4)
    g = OjaGrid(d, holdout=8, grid_size=3, block=b, row_scale=1.0, dtype="float64")
    iterates = []
    for i in range(0, len(x), b):
        g.update(x[i:i + b])
        iterates.append(np.array(g.v))
    # epochs of 1, 1, 2, 4, 8, 16 blocks (each as long as all before it); 37 blocks: prev = the 16 blocks
    # 16..31, current = blocks 32..36
    want = np.mean(iterates[16:], axis=0)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    cand = np.asarray(g.candidates())
    assert cand.shape == (9, d)
    np.testing.assert_allclose(cand[:3], iterates[-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(cand[3:6], want, rtol=0, atol=1e-12)
    assert len(g.rayleigh()) == 9 and 0 <= g.selected() < 3
    assert isinstance(g.status()["selected_average"], bool)
    assert g.status()["selected_candidate"] in ("last", "average", "checkpoint")


def test_oja_grid_checkpoint_keeps_what_a_run_had_before_a_tail_without_v1():
    # An adversarial order: the rows carrying v1 first, then a long tail of rows orthogonal to it. Every
    # fixed-η run forgets v1 over the tail; the checkpoint (the iterate at an epoch end, kept while its
    # Rayleigh quotient on the held-back sample is the best so far) still holds it, and wins the final pick.
    d = 24
    rng = np.random.default_rng(11)
    head = planted(d, 10000, top=9.0, seed=12)
    v1 = np.linalg.eigh(head.T @ head)[1][:, -1]
    tail = rng.standard_normal((40000, d)) * np.linspace(0.4, 0.1, d)  # v1 stays the top direction overall
    tail -= np.outer(tail @ v1, v1)  # no v1 at all in the tail
    x = np.concatenate([head, tail])
    exact = np.linalg.eigh(x.T @ x)[1][:, -1]
    assert abs(exact @ v1) > 0.999  # v1 is still the stream's top direction
    # all η forget; a small sample, since the head rows it gives up over the tail are fed then (eviction)
    # and would hand the last iterates some v1 back
    g = feed(OjaGrid(d, holdout=32, grid_size=4, grid_min=8e-3, dtype="float64"), x, 64)
    cand = np.asarray(g.candidates())
    last = np.abs(cand[:4] @ exact).max()
    kept = np.abs(cand[8:] @ exact).max()
    assert kept > 0.99 and kept > last + 0.05, (kept, last)
    assert abs(np.asarray(g.estimate()) @ exact) > 0.99
    # the checkpoints survive a state round trip
    back = OjaGrid.from_state_dict(g.state_dict())
    np.testing.assert_array_equal(np.asarray(back.candidates()), cand)


@pytest.mark.parametrize("seed", [2, 4])
def test_oja_grid_default_sample_picks_a_good_candidate_where_a_small_one_did_not(seed):
    # R = 1.5 presented by decreasing |⟨a, v1⟩| (the bench's `sorted` order, small d): the late rows carry no
    # v1, the large-η runs forget it, and their last iterates / tail averages have Rayleigh quotients only a
    # few % below the good checkpoints. A 256-row held-back sample (the old default) picks one of them on
    # these seeds; the default sample (1024 rows: about half the RQ noise) picks a good candidate.
    d, n = 48, 40000
    x = planted(d, n, top=1.5, seed=seed, order="sorted")
    u = top(x)[:, 0]
    small = feed(OjaGrid(d, holdout=256, dtype="float64", seed=seed), x, 1000)
    assert np.abs(np.asarray(small.candidates()) @ u).max() > 0.99  # the runs did produce a good candidate
    assert corr(small.estimate(), u) < 0.98  # ... which a 256-row sample does not pick on this stream
    g = feed(OjaGrid(d, dtype="float64", seed=seed), x, 1000)
    assert g.config.holdout == 1024
    assert corr(g.estimate(), u) >= 0.99
    assert g.status()["fed_energy"] == pytest.approx((x ** 2).sum() - (np.asarray(g.holdout[:1024]) ** 2).sum(),
                                                     rel=1e-9)  # every row but the final sample reached the runs


def test_oja_grid_memory_floats_counts_everything_it_keeps():
    g = feed(OjaGrid(37, holdout=100, grid_size=5, dtype="float64"), planted(37, 2000, top=4.0, seed=1))
    kept = [g.v, g.avg_cur, g.avg_prev, g.best, g.holdout]
    assert g.memory_floats() == sum(np.asarray(a).size for a in kept) == (4 * 5 + 100 + 1) * 37
    state = g.state_dict()
    big = {k for k, v in state.items() if isinstance(v, np.ndarray) and v.size > g.config.grid_size}
    assert big == {"v", "avg_cur", "avg_prev", "best", "holdout"}  # nothing else of size ~d in the state


# ---- StackedPower: HeavyLight's light path on L streams, batched ----

@pytest.mark.parametrize("streams,d,block,step", [(1, 1, 1, 7), (3, 37, 8, 230), (2, 64, 5, 1000), (4, 9, 9, 1)])
def test_stacked_power_equals_heavy_light_light_path_per_stream(streams, d, block, step):
    rng = np.random.default_rng(d + streams)
    n = 1300 if step > 1 else 300
    x = rng.standard_normal((streams, n, d)) * np.linspace(2, 0.3, d)
    x[-1, n // 2, d // 2] = np.inf  # a bad row in one stream only: zeroed and counted there
    seeds = [11 * i + 1 for i in range(streams)]
    sp = StackedPower(streams, d, block=block, epoch0=64, dtype="float64", seeds=seeds)
    ref = [HeavyLight(d, block=block, shuffle=0, heavy_capacity=0, epoch0=64, dtype="float64", seed=s) for s in seeds]
    for i in range(0, n, step):
        sp.update(x[:, i:i + step])
        for l in range(streams):
            ref[l].update(x[l, i:i + step])
    w = sp.light()
    assert w.shape == (streams, d, block)
    k = min(block, 2)
    for l in range(streams):
        np.testing.assert_allclose(leading_directions(w[l], k), ref[l].estimate(k), rtol=0, atol=1e-10)
    assert np.asarray(sp.nonfinite).tolist() == [0] * (streams - 1) + [1]
    if torch is not None:
        tp = StackedPower(streams, d, block=block, epoch0=64, dtype="float64", seeds=seeds, device="cpu")
        for i in range(0, n, step):
            tp.update(torch.from_numpy(x[:, i:i + step]))
        assert isinstance(tp.light(), torch.Tensor)
        np.testing.assert_allclose(tp.light().numpy(), w, rtol=1e-9, atol=1e-9 * np.abs(w).max())


def test_stacked_power_finish_warm_starts_the_next_segment():
    d = 37
    x = planted(d, 4096, top=3.0, seed=6)
    u = top(x)[:, 0]
    sp = StackedPower(1, d, block=4, epoch0=256, dtype="float64")
    sp.update(x[None])
    w = sp.finish()
    assert corr(leading_directions(w[0], 1)[:, 0], u) >= 0.999
    assert sp.rows == 0 and sp.epochs == 0 and not np.asarray(sp.light()).any()
    # the new basis is orth(w): its first column is already the leading direction's neighbour
    assert corr(np.asarray(sp.basis)[0] @ (np.asarray(sp.basis)[0].T @ u), u) >= 0.999
    sp.update(np.zeros((1, 10, d)))
    with pytest.raises(SketchFailure, match="zero"):
        leading_directions(sp.light()[0], 1)
    before = np.array(sp.basis)
    sp.finish()  # a zero product keeps the basis
    np.testing.assert_array_equal(np.asarray(sp.basis), before)


# ---- HeavyLight: heavy-row buffer bound and shuffle ----

def _with_heavy(d, n, n_heavy, seed):
    x = planted(d, n, top=3.0, seed=seed)
    rng = np.random.default_rng(seed + 7)
    pos = np.sort(rng.choice(np.arange(200, n), n_heavy, replace=False))
    total = (x ** 2).sum()
    dirs = rng.standard_normal((n_heavy, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    norms2 = total * np.linspace(0.05, 0.08, n_heavy)  # each ≥ 0.05·‖A‖_F² before they are added
    x[pos] = dirs * np.sqrt(norms2)[:, None]
    return x, pos


def test_heavy_buffer_keeps_heavy_rows_exactly_within_bound():
    d, n = 37, 3000
    x, pos = _with_heavy(d, n, 10, seed=4)
    h = HeavyLight(d, heavy_capacity=16, heavy_factor=40.0, shuffle=0, epoch0=256, dtype="float64")
    for i in range(0, n, 100):
        h.update(x[i:i + 100])
        assert int(np.count_nonzero(h.heavy_norm2)) <= 16
    rows, norms2 = h.heavy_rows()
    fro2 = (x ** 2).sum()
    is_heavy = (x ** 2).sum(1) >= fro2 / 40.0
    assert is_heavy.sum() <= 40  # at most heavy_factor rows can be heavy (Σ‖a‖² = ‖A‖_F²)
    assert set(np.flatnonzero(is_heavy)) == set(pos)
    want = x[pos][np.argsort(-(x[pos] ** 2).sum(1))]
    np.testing.assert_array_equal(rows, want)  # kept bit for bit, heaviest first
    assert h.status()["overflow"] == 0
    assert corr(h.estimate(), top(x)[:, 0]) >= 0.99


def test_heavy_buffer_overflow_is_counted_and_keeps_the_heaviest():
    d, n = 37, 3000
    x, pos = _with_heavy(d, n, 10, seed=5)
    h = feed(HeavyLight(d, heavy_capacity=4, heavy_factor=40.0, shuffle=0, epoch0=256, dtype="float64"), x, 100)
    rows, _ = h.heavy_rows()
    want = x[pos][np.argsort(-(x[pos] ** 2).sum(1))][:4]
    np.testing.assert_array_equal(rows, want)
    assert h.status()["overflow"] >= 6


@pytest.mark.parametrize("capacity,want", [(4, 6), (10, 0), (12, 0)])
def test_heavy_overflow_counts_rows_dropped_while_still_heavy(capacity, want):
    # status()["overflow"]: rows that were still heavy (‖a‖² ≥ ‖A‖_F²/heavy_factor, running) when the buffer
    # had to drop them, counted once the stream is longer than heavy_factor rows. Here 10 rows stay heavy to
    # the end (each ≥ n/20 against ‖A‖_F² ≤ 1.6n, factor 40) and 3 are heavy only early (‖a‖² = 30 at row
    # ~300, light once ‖A‖_F² > 1200): with 4 slots the 6 lightest of the 10 are overflow, the 3 early ones
    # are demoted, not counted; with ≥ 10 slots nothing overflows and every lasting heavy row is kept.
    d, n = 16, 6000
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # ‖a‖² = 1: never heavy after the first 100 rows
    early = [300, 310, 320]
    x[early] *= np.sqrt(30.0)
    late = np.sort(rng.choice(np.arange(2000, n), 10, replace=False))
    x[late] *= np.sqrt(n / 20 * (1 + rng.permutation(10) / 100))[:, None]  # distinct norms
    h = feed(HeavyLight(d, heavy_capacity=capacity, heavy_factor=40.0, shuffle=0, epoch0=256, dtype="float64"),
             x, 100)
    assert h.status()["overflow"] == want
    rows, _ = h.heavy_rows()
    n2 = (x[late] ** 2).sum(1)
    keep = late[np.argsort(-n2)][:min(capacity, 10)]
    np.testing.assert_array_equal(rows[:min(capacity, 10)], x[keep])  # the heaviest, heaviest first
    assert len(rows) == min(capacity, 10)  # the early rows were demoted once light


def test_shuffle_makes_a_sorted_stream_work_for_epoch_power_steps():
    # history=False is the plain Kacham–Woodruff epoch power step, which assumes random order.
    x = planted(37, 6000, top=3.0, seed=0, order="sorted")
    u = top(x)[:, 0]
    plain = feed(HeavyLight(37, shuffle=0, history=False, epoch0=256, dtype="float64"), x).estimate()
    mixed = feed(HeavyLight(37, shuffle=2048, history=False, epoch0=256, dtype="float64"), x).estimate()
    assert corr(plain, u) < 0.5
    assert corr(mixed, u) >= 0.99


# ---- state round trip and torch == numpy ----

@pytest.mark.parametrize("name", sorted(MAKERS))
def test_state_dict_round_trip_is_exact(name):
    d = 37
    x = planted(d, 3000, top=4.0, seed=9)
    a = feed(MAKERS[name](d), x[:1300])
    b = sk.from_state_dict(a.state_dict())
    assert type(b) is type(a)
    np.testing.assert_array_equal(a.estimate(), b.estimate())
    feed(a, x[1300:], 170)
    feed(b, x[1300:], 170)
    np.testing.assert_array_equal(a.estimate(), b.estimate())
    assert a.status() == b.status()


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_torch_path_equals_numpy_path(name):
    d = 37
    x = planted(d, 3000, top=4.0, seed=11)
    x[1500] = np.nan  # a non-finite row is dropped and counted on both paths
    a = MAKERS[name](d)
    cfg = a.config
    b = type(a)(config=cfg, device="cpu")
    for i in range(0, len(x), 230):
        a.update(x[i:i + 230])
        b.update(torch.from_numpy(x[i:i + 230]))
    vb = b.estimate()
    assert isinstance(vb, torch.Tensor) and vb.dtype == torch.float64
    np.testing.assert_allclose(vb.numpy(), a.estimate(), rtol=0, atol=1e-9)
    sa, sb = a.status(), b.status()
    assert sa["nonfinite_rows"] == sb["nonfinite_rows"] == 1
    assert sa.keys() == sb.keys()
    # a torch state loads on numpy and continues identically
    c = sk.from_state_dict(b.state_dict())
    np.testing.assert_allclose(c.estimate(), a.estimate(), rtol=0, atol=1e-9)


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_row_hash_is_identical_on_numpy_and_torch():
    # the reservoir and shuffle choices must not depend on the backend (torch promotes int·float to float32)
    idx = np.array([0, 1, 2, 255, 2**31 - 1, 2**32, 2**32 + 5, 2**40 + 3], dtype=np.int64)
    a = sk._uniform(sk._NumpyOps(), idx, 7, 1)
    b = sk._uniform(sk._TorchOps("cpu"), torch.from_numpy(idx), 7, 1)
    assert b.dtype == torch.float64
    np.testing.assert_array_equal(a, b.numpy())
    assert ((a >= 0) & (a < 1)).all() and len(set(a.tolist())) == len(a)
    big = sk._uniform(sk._NumpyOps(), np.arange(200_000, dtype=np.int64), 0, 2)
    assert abs(big.mean() - 0.5) < 0.005 and abs((big < 0.1).mean() - 0.1) < 0.005


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_torch_float32_rows_stay_on_their_device_and_dtype():
    x = torch.from_numpy(planted(37, 2000, top=4.0, seed=2)).to(torch.bfloat16)
    for make in (lambda: OjaGrid(37, holdout=64, device="cpu"), lambda: HeavyLight(37, epoch0=256, device="cpu"),
                 lambda: FrequentDirections(37, device="cpu")):
        s = make()
        for i in range(0, 2000, 300):
            s.update(x[i:i + 300])
        v = s.estimate()
        assert v.dtype == torch.float32 and v.device.type == "cpu"
        assert corr(v.numpy(), top(x.double().numpy())[:, 0]) > 0.98


# ---- merge (Frequent Directions) ----

@pytest.mark.parametrize("ell,buffer", [(3, None), (8, None), (5, 41)])
def test_fd_merge_of_halves_matches_whole_within_bound(ell, buffer):
    d = 37
    x = planted(d, 4001, top=4.0, seed=ell)
    whole = feed(FrequentDirections(d, ell=ell, buffer=buffer, dtype="float64"), x, 333)
    left = feed(FrequentDirections(d, ell=ell, buffer=buffer, dtype="float64"), x[:2000], 333)
    right = feed(FrequentDirections(d, ell=ell, buffer=buffer, dtype="float64"), x[2000:], 333)
    merged = left.merge(right)
    ata = reference.stream_second_moment([x])
    tail = np.sort(np.linalg.eigvalsh(ata))[::-1]
    for s in (whole, merged):
        b = s.sketch()
        gap = np.linalg.eigvalsh(ata - b.T @ b)  # ‖Ax‖² − ‖Bx‖² over unit x
        assert gap.min() >= -1e-9 * tail[0]
        assert gap.max() <= s.delta() * (1 + 1e-9)
        for k in range(ell):
            assert s.delta() <= tail[k:].sum() / (ell - k) * (1 + 1e-9)
    bw, bm = whole.sketch(), merged.sketch()
    diff = np.linalg.eigvalsh(bm.T @ bm - bw.T @ bw)
    assert diff.max() <= whole.delta() * (1 + 1e-9) and -diff.min() <= merged.delta() * (1 + 1e-9)
    assert merged.seen == whole.seen == 4001


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 120), d=st.integers(1, 13), ell=st.integers(2, 6), seed=st.integers(0, 10**6))
def test_fd_bound_property(n, d, ell, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)) * np.random.default_rng(seed + 1).uniform(0.1, 3, d)
    fd = feed(FrequentDirections(d, ell=ell, dtype="float64"), x, 7)
    b = fd.sketch()
    gap = np.linalg.eigvalsh(x.T @ x - b.T @ b)
    scale = max(1.0, float((x ** 2).sum()))
    assert gap.min() >= -1e-9 * scale
    assert gap.max() <= fd.delta() + 1e-9 * scale


def test_oja_and_heavy_light_refuse_merge():
    for s in (OjaGrid(8), HeavyLight(8)):
        with pytest.raises(TypeError, match="not mergeable"):
            s.merge(s)


# ---- principal angles ----

def test_principal_angle_degrees_matches_scipy():
    rng = np.random.default_rng(0)
    d = 37
    u = rng.standard_normal(d)
    for eps in (0.0, 1e-7, 1e-3, 0.3, 2.0):
        v = u + eps * rng.standard_normal(d)
        got = principal_angle_degrees(u, -v)
        assert abs(got - reference.largest_principal_angle_degrees(u, v)) < 1e-8
    for ku, kv in ((3, 3), (2, 5), (5, 2)):
        a, b = rng.standard_normal((d, ku)), rng.standard_normal((d, kv))
        b[:, :1] = a[:, :1] + 1e-6 * rng.standard_normal((d, 1))
        assert abs(principal_angle_degrees(a, b) - reference.largest_principal_angle_degrees(a, b)) < 1e-8
    assert principal_angle_degrees(np.eye(4)[:, 0], np.eye(4)[:, 1]) == pytest.approx(90.0)
    if torch is not None:
        assert principal_angle_degrees(torch.tensor(u), torch.tensor(u)) < 1e-6


# ---- bad arguments name the argument ----

@pytest.mark.parametrize("build,match", [
    (lambda: OjaGridConfig(dim=0), "dim"),
    (lambda: OjaGridConfig(dim=8, grid_ratio=1.0), "grid_ratio"),
    (lambda: OjaGridConfig(dim=8, grid_min=-1), "grid_min"),
    (lambda: OjaGridConfig(dim=8, holdout=0), "holdout"),
    (lambda: OjaGridConfig(dim=8, tau=float("nan")), "tau"),
    (lambda: OjaGridConfig(dim=8, row_scale=0.0), "row_scale"),
    (lambda: OjaGridConfig(dim=8, dtype="float16"), "dtype"),
    (lambda: HeavyLightConfig(dim=8, block=9), "block"),
    (lambda: HeavyLightConfig(dim=8, shuffle=-1), "shuffle"),
    (lambda: HeavyLightConfig(dim=8, heavy_factor=0.5), "heavy_factor"),
    (lambda: HeavyLightConfig(dim=8, epoch0=0), "epoch0"),
    (lambda: FDConfig(dim=8, ell=1), "ell"),
    (lambda: FDConfig(dim=8, ell=4, buffer=4), "buffer"),
    (lambda: OjaGrid(8).update(np.zeros((3, 7))), "rows"),
    (lambda: OjaGrid(8).update(np.zeros((3, 8))), "rows"),  # first update sets the step scale
    (lambda: FrequentDirections(8).update(np.zeros((2, 3, 8))), "rows"),
    (lambda: feed(FrequentDirections(8, ell=4), np.ones((9, 8))).estimate(k=4), "k"),
    (lambda: HeavyLight(8, block=2).estimate(k=3), "k"),
    (lambda: FrequentDirections(8, ell=4).merge(FrequentDirections(8, ell=5)), "other"),
    (lambda: sk.from_state_dict({"kind": "nope"}), "state"),
    (lambda: OjaGrid.from_state_dict(FrequentDirections(8).state_dict()), "state"),
    (lambda: principal_angle_degrees(np.ones(4), np.ones(5)), "v"),
    (lambda: principal_angle_degrees(np.zeros(4), np.ones(4)), "u"),
    (lambda: OjaGrid(8, config=OjaGridConfig(dim=8)), "config"),
    (lambda: OjaGridConfig(dim=8, clip_ratio=0.0), "clip_ratio"),
    (lambda: StackedPower(2, 8, block=9), "block"),
    (lambda: StackedPower(2, 8).update(np.zeros((3, 4, 8))), "x"),
    (lambda: StackedPower(2, 8, seeds=[1]), "seeds"),
    (lambda: leading_directions(np.ones((8, 2)), 3), "k"),
])
def test_bad_arguments_name_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_fd_drops_nonfinite_rows():
    x = planted(16, 300, top=3.0, seed=0)
    a = feed(FrequentDirections(16, ell=4, dtype="float64"), x)
    y = np.concatenate([x[:100], np.full((1, 16), np.inf), x[100:]])
    b = feed(FrequentDirections(16, ell=4, dtype="float64"), y)
    assert b.status()["nonfinite_rows"] == 1
    assert np.isfinite(b.sketch()).all()
    assert corr(b.estimate(), top(x)[:, 0]) > 0.99
