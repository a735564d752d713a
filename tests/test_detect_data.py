"""The detection benchmark's texts (bench/detect_data.py) are what their names say: troff's
accented letters survive into the man-page text, and the "foreign" shift holds no English."""

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
