"""WindowTap: per-request sliding windows -> FrameSeeds -> Frames.

The key property: frames depend only on the token rows of a request, not on
how the engine chunked them (prefill chunks, decode steps, batching).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eigenwatch.hooks.windows import Frame, FrameSeed, WindowTap, external_request_id, finalize
from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, describe
from eigenwatch.kernels.spectra import window_eigenvalues, window_spectrum


def make_tap(window=8, stride=3, max_requests=16):
    seeds: list[FrameSeed] = []
    return WindowTap(window, stride, max_requests, seeds.append), seeds


def rows_for(seed: int, n: int, d: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype)


def chunk_sizes(total: int, mode: str, rng: np.random.Generator) -> list[int]:
    if mode == "all":
        return [total]
    if mode == "ones":
        return [1] * total
    if mode == "big":  # chunks longer than any window
        sizes = []
        while sum(sizes) < total:
            sizes.append(min(17, total - sum(sizes)))
        return sizes
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(min(rng.integers(1, 12), total - sum(sizes))))
    return sizes


def feed(tap: WindowTap, req: str, layer: int, rows: torch.Tensor, sizes: list[int], step0: int = 0) -> None:
    pos = 0
    for i, n in enumerate(sizes):
        tap.add_rows(req, layer, rows[pos : pos + n], step=step0 + i)
        pos += n
    assert pos == rows.shape[0]


def key(seed: FrameSeed):
    """Everything a frame depends on except the engine step (chunking-specific)."""
    return (seed.request_id, seed.engine_request_id, seed.layer, seed.token_count, seed.skipped_tokens, seed.final)


def assert_same_seeds(a: list[FrameSeed], b: list[FrameSeed], label: str) -> None:
    assert [key(s) for s in a] == [key(s) for s in b], label
    for sa, sb in zip(a, b):
        assert sa.rows.dtype == sb.rows.dtype == torch.float32
        assert torch.equal(sa.rows, sb.rows), f"{label}: rows differ at token_count={sa.token_count}"


def expected_counts(total: int, w: int, s: int) -> list[int]:
    return [t for t in range(s, total + 1, s) if min(w, t) >= 2]


# --------------------------------------------------------------------------- chunking invariance


@pytest.mark.parametrize("w,s", [(8, 3), (8, 1), (8, 8), (4, 11), (2, 1), (64, 16), (5, 2)])
@pytest.mark.parametrize("total", [1, 2, 7, 41])
def test_frames_do_not_depend_on_chunking(w, s, total):
    rows = rows_for(w * 100 + s + total, total, 6)
    rng = np.random.default_rng(w * 1000 + s * 10 + total)
    runs = {}
    for mode in ("all", "ones", "big", "random1", "random2"):
        tap, seeds = make_tap(w, s)
        assert tap.begin("r-0123abcd", skipped_tokens=2, external_id="r")
        feed(tap, "r-0123abcd", 5, rows, chunk_sizes(total, mode, rng))
        tap.finish("r-0123abcd", step=99)
        runs[mode] = seeds
    ref = runs["all"]
    assert [s_.token_count for s_ in ref if not s_.final] == expected_counts(total, w, s)
    for mode, seeds in runs.items():
        assert_same_seeds(seeds, ref, f"W={w} s={s} T={total} chunking={mode}")


def test_chunking_invariance_with_interleaved_requests_layers_and_dtypes():
    w, s, total = 6, 4, 30
    rows = {(r, layer): rows_for(ord(r) * 10 + layer, total, 5, torch.bfloat16) for r in "ab" for layer in (0, 3)}
    rng = np.random.default_rng(0)

    def run(interleave: bool):
        tap, seeds = make_tap(w, s)
        for r in "ab":
            tap.begin(r)
        plans = {k: chunk_sizes(total, "random", rng) if interleave else [total] for k in rows}
        pos = dict.fromkeys(rows, 0)
        step = 0
        while any(pos[k] < total for k in rows):
            for k in sorted(rows):  # one engine step: every request/layer gets its next chunk
                if plans[k]:
                    n = plans[k].pop(0)
                    tap.add_rows(k[0], k[1], rows[k][pos[k] : pos[k] + n], step)
                    pos[k] += n
            step += 1
        for r in "ab":
            tap.finish(r, step)
        return sorted(seeds, key=lambda x: (x.request_id, x.layer, x.token_count, x.final))

    once, chunked = run(False), run(True)
    assert_same_seeds(chunked, once, "interleaved")
    for sd in once:  # bf16 rows are carried exactly as float32
        src = rows[(sd.request_id, sd.layer)].float()
        assert torch.equal(sd.rows, src[max(0, sd.token_count - w) : sd.token_count])


# --------------------------------------------------------------------------- boundaries


@pytest.mark.parametrize("w,s", [(8, 3), (4, 4), (3, 10), (16, 1)])
def test_boundaries_and_window_contents(w, s):
    total = 37
    rows = rows_for(1, total, 9, torch.float64)
    tap, seeds = make_tap(w, s)
    tap.begin("q")
    feed(tap, "q", 0, rows, chunk_sizes(total, "random", np.random.default_rng(5)))
    live = [sd for sd in seeds if not sd.final]
    assert [sd.token_count for sd in live] == expected_counts(total, w, s)
    for sd in live:
        t = sd.token_count
        assert sd.rows.shape == (min(w, t), 9)
        assert sd.rows.dtype == torch.float32
        assert torch.equal(sd.rows, rows[t - min(w, t) : t].float())
        assert not sd.final
    assert not any(sd.final for sd in seeds)  # nothing final before finish


def test_first_boundary_with_one_row_emits_nothing():
    tap, seeds = make_tap(window=4, stride=1)
    tap.begin("x")
    rows = rows_for(2, 3, 5)
    tap.add_rows("x", 0, rows[:1], step=0)
    assert seeds == []  # t=1: a single row has no spectrum
    tap.add_rows("x", 0, rows[1:], step=1)
    assert [sd.token_count for sd in seeds] == [2, 3]
    assert torch.equal(seeds[0].rows, rows[:2])


def test_steps_are_those_of_the_crossing_call():
    tap, seeds = make_tap(window=4, stride=2)
    tap.begin("x")
    rows = rows_for(3, 6, 3)
    tap.add_rows("x", 0, rows[:3], step=10)  # crosses t=2
    tap.add_rows("x", 0, rows[3:4], step=11)  # crosses t=4
    tap.add_rows("x", 0, rows[4:5], step=12)  # no boundary
    tap.finish("x", step=13)
    assert [(sd.token_count, sd.step, sd.final) for sd in seeds] == [(2, 10, False), (4, 11, False), (5, 13, True)]


@pytest.mark.parametrize("total", [2, 5, 8, 9, 30])
def test_finish_emits_one_final_frame_per_layer(total):
    w, s = 8, 4
    tap, seeds = make_tap(w, s)
    tap.begin("f", skipped_tokens=3, external_id="ext")
    data = {layer: rows_for(layer, total, 4 + layer) for layer in (7, 2, 11)}
    for layer, rows in data.items():
        feed(tap, "f", layer, rows, chunk_sizes(total, "random", np.random.default_rng(layer)))
    seeds.clear()
    tap.finish("f", step=42)
    assert [sd.layer for sd in seeds] == [2, 7, 11]  # one per layer, in layer order
    for sd in seeds:
        assert sd.final and sd.step == 42 and sd.token_count == total
        assert sd.request_id == "ext" and sd.engine_request_id == "f" and sd.skipped_tokens == 3
        assert torch.equal(sd.rows, data[sd.layer][-min(w, total):])
    assert not tap.tracked("f")
    tap.add_rows("f", 2, data[2], step=43)  # forgotten: ignored
    tap.finish("f", step=44)
    assert len(seeds) == 3


def test_finish_with_one_row_or_no_rows_emits_nothing():
    tap, seeds = make_tap(window=4, stride=5)
    tap.begin("one")
    tap.add_rows("one", 0, rows_for(0, 1, 3), step=0)
    tap.add_rows("one", 1, torch.zeros(0, 3), step=0)  # empty chunk: no track
    tap.finish("one", step=1)
    assert seeds == []
    assert not tap.tracked("one")


def test_finish_unknown_is_noop_and_drop_forgets_silently():
    tap, seeds = make_tap(window=4, stride=100, max_requests=1)
    tap.finish("nobody", step=0)
    tap.drop("nobody")
    assert seeds == []
    tap.begin("d")
    tap.add_rows("d", 0, rows_for(0, 10, 3), step=0)
    tap.drop("d")
    assert not tap.tracked("d")
    tap.finish("d", step=1)
    assert seeds == []
    assert tap.begin("e")  # the dropped request's slot is free again


def test_seed_rows_are_private_copies():
    # hosts reuse their activation buffers: later writes must not leak into seeds
    tap, seeds = make_tap(window=4, stride=2)
    tap.begin("p")
    buf = rows_for(9, 3, 5)
    orig = buf.clone()
    tap.add_rows("p", 0, buf, step=0)  # emits t=2
    buf.fill_(1e6)  # engine overwrites its buffer
    nxt = rows_for(10, 1, 5)
    tap.add_rows("p", 0, nxt, step=1)  # emits t=4 from the tap's own copy of rows 1..2
    tap.finish("p", step=2)
    assert torch.equal(seeds[0].rows, orig[:2])
    assert torch.equal(seeds[1].rows, torch.cat([orig, nxt]))
    assert torch.equal(seeds[2].rows, torch.cat([orig, nxt]))
    seeds[1].rows.zero_()  # mutating a seed does not affect another
    assert torch.equal(seeds[2].rows, torch.cat([orig, nxt]))


# --------------------------------------------------------------------------- admission


def test_max_requests_bound_and_untracked_count():
    tap, seeds = make_tap(window=4, stride=2, max_requests=2)
    assert tap.begin("a") and tap.begin("b")
    assert tap.begin("a")  # already tracked: fine, not counted
    assert tap.untracked == 0
    assert not tap.begin("c")
    assert not tap.begin("c")
    assert tap.untracked == 2
    assert not tap.tracked("c")
    tap.add_rows("c", 0, rows_for(0, 10, 3), step=0)
    assert seeds == [] and tap.rows_seen == 0
    tap.add_rows("a", 0, rows_for(0, 4, 3), step=0)
    assert tap.rows_seen == 4 and [sd.request_id for sd in seeds] == ["a", "a"]
    tap.finish("c", step=1)  # never tracked: no-op
    assert len(seeds) == 2
    tap.finish("a", step=1)
    assert tap.begin("c")  # a slot freed up
    assert tap.untracked == 2


def test_zero_max_requests_tracks_nothing():
    tap, _ = make_tap(max_requests=0)
    assert not tap.begin("a")
    assert tap.untracked == 1


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize("engine,external", [
    ("0-bf79eb1f", "0"),
    ("cmpl-abc-0-1234abcd", "cmpl-abc-0"),
    ("chatcmpl-9f8e7d6c5b4a-00000000", "chatcmpl-9f8e7d6c5b4a"),
    ("0", "0"),
    ("plain", "plain"),
    ("req-1234567", "req-1234567"),  # 7 hex: not an engine suffix
    ("req-123456789", "req-123456789"),  # 9 hex
    ("req-BF79EB1F", "req-BF79EB1F"),  # engine suffixes are lower-case
    ("req-bf79eb1g", "req-bf79eb1g"),  # not hex
    ("bf79eb1f", "bf79eb1f"),  # no dash
    ("a-bf79eb1f-x", "a-bf79eb1f-x"),  # not at the end
    ("", ""),
])
def test_external_request_id(engine, external):
    assert external_request_id(engine) == external


def test_ids_and_skipped_tokens_are_carried_into_seeds():
    tap, seeds = make_tap(window=4, stride=2)
    tap.begin("0-bf79eb1f", skipped_tokens=17, external_id=external_request_id("0-bf79eb1f"))
    tap.begin("solo")  # external id defaults to the engine id
    for r in ("0-bf79eb1f", "solo"):
        tap.add_rows(r, 1, rows_for(0, 3, 4), step=0)
        tap.finish(r, step=1)
    got = [(sd.request_id, sd.engine_request_id, sd.skipped_tokens, sd.final) for sd in seeds]
    assert got == [("0", "0-bf79eb1f", 17, False), ("0", "0-bf79eb1f", 17, True),
                   ("solo", "solo", 0, False), ("solo", "solo", 0, True)]


# --------------------------------------------------------------------------- finalize


def test_finalize_matches_kernels_for_every_layer():
    w, s, total = 8, 5, 23
    tap, seeds = make_tap(w, s)
    tap.begin("m-0000beef", skipped_tokens=1, external_id="m")
    data = {0: rows_for(100, total, 16), 5: rows_for(105, total, 16) * 10 + 3, 9: rows_for(109, total, 3)}
    rng = np.random.default_rng(1)
    for layer, rows in data.items():
        feed(tap, "m-0000beef", layer, rows, chunk_sizes(total, "random", rng))
    tap.finish("m-0000beef", step=7)
    assert len(seeds) == 3 * (len(expected_counts(total, w, s)) + 1)
    for sd in seeds:
        fr = finalize(sd, "tiny-model")
        assert isinstance(fr, Frame)
        src = data[sd.layer][sd.token_count - min(w, sd.token_count) : sd.token_count]
        assert torch.equal(sd.rows, src)  # each layer's window comes from its own rows
        want_eigs = window_eigenvalues(src).numpy()
        want_desc = describe(want_eigs, *src.shape, row_sq_norms=window_spectrum(src)[1].numpy())
        assert (fr.request_id, fr.engine_request_id, fr.model) == ("m", "m-0000beef", "tiny-model")
        assert (fr.layer, fr.step, fr.token_count, fr.skipped_tokens, fr.final) == (
            sd.layer, sd.step, sd.token_count, sd.skipped_tokens, sd.final)
        assert (fr.window, fr.dim) == tuple(src.shape)
        assert fr.eigenvalues.dtype == np.float32 and fr.eigenvalues.shape == (src.shape[0],)
        np.testing.assert_allclose(fr.eigenvalues, want_eigs.astype(np.float32), rtol=1e-6, atol=1e-6 * want_eigs[0])
        assert fr.descriptors.shape == (len(DESCRIPTOR_NAMES),)
        np.testing.assert_allclose(fr.descriptors, want_desc, rtol=1e-9, atol=1e-12)
        for name in ("lambda1", "spikes", "window", "gamma"):
            assert fr.descriptor(name) == pytest.approx(want_desc[DESCRIPTOR_NAMES.index(name)])
        assert fr.descriptor("window") == src.shape[0]


def test_finalize_rejects_bad_windows():
    bad = FrameSeed("r", "r", 0, 0, 2, 0, torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        finalize(bad, "m")


# --------------------------------------------------------------------------- constructor


@pytest.mark.parametrize("window,stride,match", [(1, 1, "window"), (0, 4, "window"), (-3, 4, "window"),
                                                 (4, 0, "stride"), (4, -1, "stride")])
def test_constructor_rejects_bad_arguments(window, stride, match):
    with pytest.raises(ValueError, match=match):
        WindowTap(window, stride, 4, lambda seed: None)
