"""WindowTap (hooks/windows.py), the one windowing path of both taps:
per-request sliding windows -> FrameSeeds -> Frames, against float64
reference windows (tests/reference.py).

The key property: a request's frames depend only on its token rows, not on
how the engine chunked or batched them (prefill chunks, decode steps, other
requests in the same step), up to fp32 rounding of the window Gram.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from eigenwatch.hooks._vllm_worker import external_request_id
from eigenwatch.hooks.frames import Frame
from eigenwatch.hooks.windows import FrameSeed, WindowTap, to_frames
from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, describe

import reference

EIG_RTOL = 1e-4  # fp32 Gram of rows relative to the first row, float64 eigensolve


def make_tap(window=8, stride=3, max_requests=16, proj_dim=None):
    seeds: list[FrameSeed] = []
    return WindowTap(window, stride, max_requests, seeds.append, proj_dim=proj_dim), seeds


def rows_for(seed: int, n: int, d: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * 2 + 3).to(dtype)  # off-centre, as hidden states are


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
        tap.add_layer(layer, rows[pos : pos + n], [(req, 0, n)], step=step0 + i)
        pos += n
    assert pos == rows.shape[0]


def key(f):
    """Everything a frame depends on except the engine step (chunking-specific)."""
    return (f.request_id, f.engine_request_id, f.layer, f.token_count, f.skipped_tokens, f.final)


def frames_of(seeds, model="m") -> list[Frame]:
    frames, failed = to_frames(seeds, model)
    assert not failed, failed
    return frames


def expected_counts(total: int, w: int, s: int) -> list[int]:
    return [t for t in range(s, total + 1, s) if min(w, t) >= 2]


def assert_frame_matches_rows(fr: Frame, src: torch.Tensor, label: str) -> None:
    """One frame against the float64 reference window of the rows it should hold."""
    want_eigs, want_rows = reference.window_spectrum(src.double().numpy())
    assert (fr.window, fr.dim) == tuple(src.shape), label
    assert fr.eigenvalues.dtype == np.float32 and fr.eigenvalues.shape == (src.shape[0],)
    tol = EIG_RTOL * max(want_eigs[0], 1e-30)
    bad = np.abs(fr.eigenvalues - want_eigs) > tol
    assert not bad.any(), f"{label}: eigenvalues {np.argwhere(bad)[:4].ravel()} got {fr.eigenvalues[bad][:4]} " \
                          f"want {want_eigs[bad][:4]}"
    want_desc = describe(want_eigs, *src.shape, row_sq_norms=want_rows)
    np.testing.assert_allclose(fr.descriptors, want_desc, rtol=2e-3, atol=1e-4 * max(1.0, abs(want_desc[0])),
                               err_msg=label)


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
        runs[mode] = frames_of(seeds)
    ref = runs["all"]
    assert [f.token_count for f in ref if not f.final] == expected_counts(total, w, s)
    for mode, frames in runs.items():
        assert [key(f) for f in frames] == [key(f) for f in ref], mode
        for f in frames:
            src = rows[max(0, f.token_count - w) : f.token_count]
            assert_frame_matches_rows(f, src, f"W={w} s={s} T={total} {mode} t={f.token_count}")


@pytest.mark.parametrize("w, s, proj", [(8, 4, None), (16, 5, None), (5, 3, None), (32, 16, None), (16, 4, 12)])
def test_frames_under_continuous_batching_match_reference_windows(w, s, proj):
    """Seven requests through four slots (slots are reused), each step a mix of
    decode rows and prefill chunks of several requests in one stream, as vLLM's
    flattened batch: every frame equals the float64 reference of its window."""
    rng = random.Random(w * 31 + s)
    d = 24
    lengths = {f"r{i}": rng.randint(1, 90) for i in range(7)}
    streams = {rid: rows_for(i, n, d) for i, (rid, n) in enumerate(lengths.items())}
    tap, seeds = make_tap(w, s, max_requests=4, proj_dim=proj)
    pending = list(streams)
    active: dict[str, int] = {}
    step = 0
    while pending or active:
        while pending and len(active) < 4:
            rid = pending.pop()
            assert tap.begin(rid)
            active[rid] = 0
        parts, items, n = [], [], 0
        for rid, pos in list(active.items()):
            k = 1 if rng.random() < 0.7 else rng.randint(2, 40)
            chunk = streams[rid][pos : pos + k]
            parts.append(chunk)
            items.append((rid, n, n + len(chunk)))
            n += len(chunk)
            active[rid] = pos + len(chunk)
        step += 1
        tap.add_layer(0, torch.cat(parts), items, step)
        for rid, pos in list(active.items()):
            if pos >= len(streams[rid]):
                tap.finish(rid, step)
                del active[rid]
    frames = frames_of(seeds)
    want = {(rid, t, False) for rid, n in lengths.items() for t in expected_counts(n, w, s)}
    want |= {(rid, n, True) for rid, n in lengths.items() if n >= 2}
    assert {(f.request_id, f.token_count, f.final) for f in frames} == want
    bank = tap.banks[(0,)]
    for f in frames:
        src = streams[f.request_id][max(0, f.token_count - w) : f.token_count]
        if proj is None:
            assert_frame_matches_rows(f, src, f"{f.request_id} t={f.token_count}")
        else:  # the same windows seen through the layer's fixed projection; γ uses k
            assert f.dim == proj
            x = (src.double() - src[:1].double()) @ bank.proj[0].double()  # [L, d, k]: layer 0
            want_eigs = reference.window_eigenvalues(x.numpy()) * proj / d  # Gram / d, not / k
            np.testing.assert_allclose(f.eigenvalues, want_eigs, rtol=0, atol=EIG_RTOL * want_eigs[0])


def test_interleaved_requests_layers_and_bf16_rows():
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
            for layer in (0, 3):  # one engine step: every request's next chunk in one stream per layer
                parts, items, n = [], [], 0
                for r in "ab":
                    if plans[(r, layer)]:
                        m = plans[(r, layer)].pop(0)
                        parts.append(rows[(r, layer)][pos[(r, layer)] : pos[(r, layer)] + m])
                        items.append((r, n, n + m))
                        n += m
                        pos[(r, layer)] += m
                if parts:
                    tap.add_layer(layer, torch.cat(parts), items, step)
            step += 1
        for r in "ab":
            tap.finish(r, step)
        return sorted(frames_of(seeds), key=key)

    once, chunked = run(False), run(True)
    assert [key(f) for f in chunked] == [key(f) for f in once]
    for f in chunked:  # bf16 rows are carried exactly as float32
        src = rows[(f.request_id, f.layer)].float()[max(0, f.token_count - w) : f.token_count]
        assert_frame_matches_rows(f, src, f"{f.request_id} layer {f.layer} t={f.token_count}")


# --------------------------------------------------------------------------- boundaries


def test_first_boundary_with_one_row_emits_nothing():
    tap, seeds = make_tap(window=4, stride=1)
    tap.begin("x")
    rows = rows_for(2, 3, 5)
    tap.add_layer(0, rows[:1], [("x", 0, 1)], step=0)
    assert seeds == []  # t=1: a single row has no spectrum
    tap.add_layer(0, rows[1:], [("x", 0, 2)], step=1)
    assert [sd.token_count for sd in seeds] == [2, 3]
    assert_frame_matches_rows(frames_of(seeds[:1])[0], rows[:2], "t=2")


def test_steps_are_those_of_the_crossing_call():
    tap, seeds = make_tap(window=4, stride=2)
    tap.begin("x")
    rows = rows_for(3, 6, 3)
    tap.add_layer(0, rows[:3], [("x", 0, 3)], step=10)  # crosses t=2
    tap.add_layer(0, rows[3:4], [("x", 0, 1)], step=11)  # crosses t=4
    tap.add_layer(0, rows[4:5], [("x", 0, 1)], step=12)  # no boundary
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
    for f in frames_of(seeds):
        assert f.final and f.step == 42 and f.token_count == total
        assert f.request_id == "ext" and f.engine_request_id == "f" and f.skipped_tokens == 3
        assert_frame_matches_rows(f, data[f.layer][-min(w, total):], f"final layer {f.layer}")
    assert not tap.tracked("f")
    tap.add_layer(2, data[2], [("f", 0, total)], step=43)  # forgotten: ignored
    tap.finish("f", step=44)
    assert len(seeds) == 3


def test_finish_with_one_row_or_no_rows_emits_nothing():
    tap, seeds = make_tap(window=4, stride=5)
    tap.begin("one")
    tap.add_layer(0, rows_for(0, 1, 3), [("one", 0, 1)], step=0)
    tap.finish("one", step=1)
    assert seeds == []
    assert not tap.tracked("one")


def test_finish_unknown_is_noop_and_drop_forgets_silently():
    tap, seeds = make_tap(window=4, stride=100, max_requests=1)
    tap.finish("nobody", step=0)
    tap.drop("nobody")
    assert seeds == []
    tap.begin("d")
    tap.add_layer(0, rows_for(0, 10, 3), [("d", 0, 10)], step=0)
    tap.drop("d")
    assert not tap.tracked("d")
    tap.finish("d", step=1)
    assert seeds == []
    assert tap.begin("e")  # the dropped request's slot is free again
    rows = rows_for(1, 5, 3)
    tap.add_layer(0, rows, [("e", 0, 5)], step=2)
    tap.finish("e", step=3)  # nothing of d's rows leaks into e's window
    assert_frame_matches_rows(frames_of(seeds)[0], rows[-4:], "reused slot")


def test_seeds_are_private_copies():
    # hosts reuse their activation buffers: later writes must not leak into seeds
    tap, seeds = make_tap(window=4, stride=2)
    tap.begin("p")
    buf = rows_for(9, 3, 5)
    orig = buf.clone()
    tap.add_layer(0, buf, [("p", 0, 3)], step=0)  # emits t=2
    buf.fill_(1e6)  # engine overwrites its buffer
    nxt = rows_for(10, 1, 5)
    tap.add_layer(0, nxt, [("p", 0, 1)], step=1)  # emits t=4 from the tap's own copy of rows 1..2
    tap.finish("p", step=2)
    frames = frames_of(seeds)
    assert_frame_matches_rows(frames[0], orig[:2], "t=2")
    assert_frame_matches_rows(frames[1], torch.cat([orig, nxt]), "t=4")
    assert_frame_matches_rows(frames[2], torch.cat([orig, nxt]), "final")


def test_nan_rows_make_only_their_frames_fail():
    tap, seeds = make_tap(window=4, stride=2, max_requests=2)
    tap.begin("ok")
    tap.begin("bad")
    rows = rows_for(4, 8, 6)
    rows[6, 2] = float("nan")  # bad's third row
    tap.add_layer(0, rows, [("ok", 0, 4), ("bad", 4, 8)], step=1)
    frames, failed = to_frames(seeds, "m")
    assert [(f.request_id, f.token_count) for f in frames] == [("ok", 2), ("ok", 4), ("bad", 2)]
    assert [(sd.request_id, sd.token_count, why) for sd, why in failed] == [
        ("bad", 4, "window: contains NaN or Inf activations")]  # dropped (and counted) by the exporter
    # The NaN row stays in the released slot's ring: the next request in that
    # slot must not see it, by prefill or by decode rows.
    tap.drop("bad")
    seeds.clear()
    tap.begin("next")
    fresh = rows_for(5, 6, 6)
    tap.add_layer(0, fresh[:1], [("next", 0, 1)], step=2)
    tap.add_layer(0, fresh[1:2], [("next", 0, 1)], step=3)
    tap.add_layer(0, fresh[2:], [("next", 0, 4)], step=4)
    frames, failed = to_frames(seeds, "m")
    assert not failed and [f.token_count for f in frames] == [2, 4, 6]
    for f in frames:
        assert_frame_matches_rows(f, fresh[max(0, f.token_count - 4) : f.token_count], f"t={f.token_count}")


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
    tap.add_layer(0, rows_for(0, 10, 3), [("c", 0, 10)], step=0)
    assert seeds == [] and tap.rows_seen == 0
    tap.add_layer(0, rows_for(0, 4, 3), [("a", 0, 4)], step=0)
    assert tap.rows_seen == 4 and [sd.request_id for sd in seeds] == ["a", "a"]
    tap.finish("c", step=1)  # never tracked: no-op
    assert len(seeds) == 2
    tap.finish("a", step=1)
    assert tap.begin("c")  # a slot freed up
    assert tap.untracked == 2


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


def test_ids_and_skipped_tokens_are_carried_into_frames():
    tap, seeds = make_tap(window=4, stride=2)
    tap.begin("0-bf79eb1f", skipped_tokens=17, external_id=external_request_id("0-bf79eb1f"))
    tap.begin("solo")  # external id defaults to the engine id
    for r in ("0-bf79eb1f", "solo"):
        tap.add_layer(1, rows_for(0, 3, 4), [(r, 0, 3)], step=0)
        tap.finish(r, step=1)
    got = [(f.request_id, f.engine_request_id, f.skipped_tokens, f.final, f.model) for f in frames_of(seeds, "mdl")]
    assert got == [("0", "0-bf79eb1f", 17, False, "mdl"), ("0", "0-bf79eb1f", 17, True, "mdl"),
                   ("solo", "solo", 0, False, "mdl"), ("solo", "solo", 0, True, "mdl")]


def test_frame_descriptor_lookup_by_name():
    tap, seeds = make_tap(window=8, stride=8)
    tap.begin("q")
    rows = rows_for(5, 8, 16)
    tap.add_layer(0, rows, [("q", 0, 8)], step=0)
    fr = frames_of(seeds)[0]
    for name in ("lambda1", "spikes", "window", "gamma"):
        assert fr.descriptor(name) == fr.descriptors[DESCRIPTOR_NAMES.index(name)]
    assert fr.descriptor("window") == 8 and fr.descriptor("gamma") == pytest.approx(7 / 16)


def test_a_request_with_a_signature_or_statistics_sends_all_its_frames_in_order():
    """The sidecar applies a batch's Frame messages before its column blocks, so a request
    whose final frame carries a signature (or whose last running frame carries statistics)
    sends every frame of it in that batch as a Frame message, in order; others go as columns."""
    from eigenwatch.hooks.frames import batch

    tap, seeds = make_tap(window=4, stride=2)
    for r in ("a", "b", "c"):
        tap.begin(r)
        tap.add_layer(1, rows_for(hash(r) % 7, 7, 4), [(r, 0, 7)], step=0)
        tap.finish(r, step=1)
    frames = frames_of(seeds, "mdl")
    for f in frames:
        if f.request_id == "a" and f.final:
            f.signature = (np.array([3]), np.array([1.0]))
        if f.request_id == "c" and f.token_count == 6:  # a running value on its last window of the step
            f.hidden = (6, 1.0, 1.0, None, "cal", None)
    msg = batch(frames)
    assert [(f.engine_request_id, f.token_count) for f in msg.frames] == \
        [(f.engine_request_id, f.token_count) for f in frames if f.engine_request_id in ("a", "c")]
    assert [f.token_count for f in msg.frames if f.engine_request_id == "a"] == [2, 4, 6, 7]
    assert {e for block in msg.columns for e in block.engine_request_ids} == {"b"}


# --------------------------------------------------------------------------- constructor


@pytest.mark.parametrize("window,stride,max_requests,match", [
    (1, 1, 4, "window"), (0, 4, 4, "window"), (-3, 4, 4, "window"), (4, 0, 4, "stride"), (4, -1, 4, "stride"),
    (4, 4, 0, "max_requests")])
def test_constructor_rejects_bad_arguments(window, stride, max_requests, match):
    with pytest.raises(ValueError, match=match):
        WindowTap(window, stride, max_requests, lambda seed: None)
