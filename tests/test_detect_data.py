"""The detection benchmark's texts (bench/detect_data.py) are what their names say: troff's
accented letters survive into the man-page text, the "foreign" shift holds no English, corpus C
is the package descriptions once each, and a corpus too small for the asked split is scaled or refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import detect_data  # noqa: E402


def test_troff_special_characters_become_letters():
    line = r"zum Herunterladen \(:uber das Netz, standardm\(:a\(ssig \(Fo gesetzt\(Fc, caf\('e \[u00E7]a \(em fin"
    assert detect_data._troff_escapes(line) == "zum Herunterladen über das Netz, standardmäßig « gesetzt», café ça — fin"
    # font changes and unknown special characters still leave nothing behind
    assert detect_data._troff_escapes(r"\fBbold\fR and \(zz gone") == "bold and  gone"


def test_english_rate_separates_english_from_translated_text():
    english = "The file is read at start-up, and the options in it are applied to all of the sessions."
    german = "Die Datei wird beim Start gelesen, und die Optionen darin gelten für alle Sitzungen."
    swedish = "Filen läses vid uppstart och alternativen i den gäller för alla sessioner."
    assert detect_data.english_rate(english) >= 0.3
    assert detect_data.english_rate(german) < 0.2 and detect_data.english_rate(swedish) < 0.2


def test_the_foreign_shift_holds_no_english_paragraphs():
    if not any(p.is_dir() and not p.name.startswith("man") for p in Path("/usr/share/man").glob("*")):
        pytest.skip("no translated man pages under /usr/share/man/<lang>/ on this machine")
    foreign = detect_data._foreign_sources()
    assert len(foreign) >= 1000
    assert max(detect_data.english_rate(p) for p in foreign) < 0.2
    # the composed letters are there (German, Swedish, Polish, … man pages)
    assert sum(any(c in p for c in "äöüåéèçąęł") for p in foreign) > len(foreign) // 4


def test_corpus_c_is_the_package_descriptions_each_once(tmp_path):
    status = tmp_path / "status"
    long = "It provides a small library for parsing configuration files and a command line tool to check them."
    status.write_text(
        "Package: libfoo1\nStatus: install ok installed\nDescription: foo library\n"
        f" {long}\n .\n It is fast.\nHomepage: https://example.org\n\n"
        # the same text under another package (a library's -dev twin): kept once
        f"Package: libfoo-dev\nDescription: foo library (development files)\n {long}\n .\n It is fast.\n\n"
        "Package: tiny\nDescription: too short\n Just a few words.\n\n"
        "Package: nodesc\nVersion: 1\n")
    got = detect_data.dpkg_descriptions(str(status))
    assert got == [long + " It is fast."]  # "." paragraph marks gone, the next field not read
    assert detect_data.dpkg_descriptions(str(tmp_path / "missing")) == []


def test_a_small_corpus_keeps_the_split_scaled_and_a_too_small_one_is_refused(tmp_path, monkeypatch):
    texts = [f"text number {i} of a small corpus with enough words" for i in range(520)]
    monkeypatch.setattr(detect_data, "texts_of", lambda corpus, regime, seed=0: list(texts))
    with pytest.warns(UserWarning, match="520 texts; using 240 reference and 280 held-out, 100 per shift"):
        files = detect_data.build_transfer(tmp_path, "C", "paragraph")
    n = {k: sum(1 for _ in open(v)) for k, v in files.items()}
    assert n["reference"] == 240 and n["heldout"] == 280 and n["word_shuffle"] == 100
    monkeypatch.setattr(detect_data, "texts_of", lambda corpus, regime, seed=0: texts[:200])
    with pytest.raises(SystemExit, match="too few for 150 reference texts"):
        detect_data.build_transfer(tmp_path, "C", "paragraph")
