"""Tap configuration from the environment: defaults, layer choice, and errors
that name the variable and the accepted values."""

import pytest

from eigenwatch.hooks.config import (TapConfig, bad_request_opt, default_layers, enabled, parse_layers, request_opt,
                                     resolve_layers)


def test_defaults_and_overrides(monkeypatch):
    for key in ("SIDECAR", "LAYERS", "WINDOW", "STRIDE", "DEFAULT", "MODEL_NAME", "MAX_REQUESTS", "PROJ_DIM"):
        monkeypatch.delenv("EIGENWATCH_" + key, raising=False)
    cfg = TapConfig.from_env()
    assert (cfg.sidecar, cfg.layers, cfg.window, cfg.stride, cfg.default, cfg.proj_dim) == (
        "127.0.0.1:50151", None, 32, 16, "on", 0)
    monkeypatch.setenv("EIGENWATCH_LAYERS", "4, -1")
    monkeypatch.setenv("EIGENWATCH_WINDOW", "48")
    monkeypatch.setenv("EIGENWATCH_DEFAULT", "OFF")
    cfg = TapConfig.from_env()
    assert cfg.layers == (4, -1) and cfg.window == 48 and cfg.default == "off"


@pytest.mark.parametrize("key, value, words", [
    ("WINDOW", "abc", ["EIGENWATCH_WINDOW", "integer", "[2, 1024]"]),
    ("WINDOW", "1", ["EIGENWATCH_WINDOW", "[2, 1024]", "got 1"]),
    ("STRIDE", "0", ["EIGENWATCH_STRIDE", "got 0"]),
    ("DEFAULT", "maybe", ["EIGENWATCH_DEFAULT", "on, off", "'maybe'"]),
    ("LAYERS", "1,x", ["EIGENWATCH_LAYERS", "'1,x'"]),
    ("SPECTRA", "gpu", ["EIGENWATCH_SPECTRA", "auto, sidecar, tap", "'gpu'"]),
])
def test_bad_values_name_the_variable_and_accepted_values(monkeypatch, key, value, words):
    monkeypatch.setenv("EIGENWATCH_" + key, value)
    with pytest.raises(ValueError) as err:
        TapConfig.from_env()
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("spectra, window, in_sidecar", [
    ("auto", 32, True), ("auto", 64, True), ("auto", 65, False), ("tap", 32, False), ("sidecar", 512, True)])
def test_where_spectra_are_computed(monkeypatch, spectra, window, in_sidecar):
    monkeypatch.setenv("EIGENWATCH_SPECTRA", spectra)
    monkeypatch.setenv("EIGENWATCH_WINDOW", str(window))
    assert TapConfig.from_env().spectra_in_sidecar() is in_sidecar


def test_layers():
    assert default_layers(4) == (1, 2, 3) and default_layers(6) == (1, 3, 4) and default_layers(32) == (8, 16, 24)
    assert default_layers(1) == (0,)
    assert resolve_layers(parse_layers("0,-1,-1"), 6) == (0, 5)
    with pytest.raises(ValueError, match=r"EIGENWATCH_LAYERS: layer 6 is out of range .* -6\.\.5"):
        resolve_layers((6,), 6)


def test_kill_switch_wins(monkeypatch):
    monkeypatch.setenv("EIGENWATCH_ENABLE", "1")
    monkeypatch.delenv("EIGENWATCH_DISABLE", raising=False)
    assert enabled()
    monkeypatch.setenv("EIGENWATCH_DISABLE", "1")
    assert not enabled()


def test_per_request_opt():
    assert request_opt(None, "on") and not request_opt(None, "off")
    assert not request_opt({"eigenwatch": "off"}, "on") and request_opt({"eigenwatch": "on"}, "off")
    assert request_opt({"eigenwatch": 1}, "off") and not request_opt({"eigenwatch": False}, "on")
    # A bad per-request value must never fail the request: the default applies.
    assert request_opt({"eigenwatch": "banana"}, "on") and not request_opt({"eigenwatch": "banana"}, "off")


def test_bad_per_request_opt_is_named():
    assert bad_request_opt(None) is None and bad_request_opt({"other": 1}) is None
    assert bad_request_opt({"eigenwatch": "OFF "}) is None and bad_request_opt({"eigenwatch": True}) is None
    msg = bad_request_opt({"eigenwatch": "banana"})
    assert "vllm_xargs.eigenwatch" in msg and "'banana'" in msg and "'on' or 'off'" in msg
