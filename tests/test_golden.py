"""Golden numbers: seeded tiny configurations whose certificates, counts, metrics and trained weights
are pinned in tests/golden_numbers.json under NUMBERS_VERSION (see medcert_core.testing.golden).

A change that moves a number fails here until NUMBERS_VERSION is bumped and the file written again;
a refactor that moves none keeps every stored run and executed chapter valid.
"""

from __future__ import annotations

import importlib
import json

import pytest

import medcert_core
from medcert_core import smoothing
from medcert_core.testing import golden

certify_module = importlib.import_module("medcert_core.certify")  # the package re-exports a function of that name
REGENERATE = "bump NUMBERS_VERSION in medcert_core/__init__.py, then: python -m medcert_core.testing.golden --write"


@pytest.fixture(scope="module")
def computed():
    return golden.golden_numbers()


@pytest.mark.slow
def test_the_golden_numbers_have_not_moved(computed):
    moved = golden.golden_differences(golden.load_golden(), computed)
    assert not moved, f"{len(moved)} numbers moved ({REGENERATE}):\n" + "\n".join(moved[:20])


def test_a_platform_pin_excuses_training_only():
    """A further training pin lets training numbers match it; a moved statistic still fails, and a
    training number matching neither pin fails."""
    main = {"statistics": {"radius": 1.0}, "training_and_study": {"segmenter": [1.0, 2.0]}}
    other_cpu = {"platform": "x86_64 AVX512 test", "numbers": {"segmenter": [1.5, 2.5]}}
    pinned = {"numbers": main, "training_pins": [other_cpu]}
    assert golden.golden_differences(pinned, {"statistics": {"radius": 1.0}, "training_and_study": {"segmenter": [1.5, 2.5]}}) == []
    assert golden.golden_differences(pinned, main) == []
    assert golden.golden_differences(pinned, {"statistics": {"radius": 1.0}, "training_and_study": {"segmenter": [1.5, 2.6]}})
    moved = golden.golden_differences(pinned, {"statistics": {"radius": 1.1}, "training_and_study": {"segmenter": [1.5, 2.5]}})
    assert moved == ["/statistics/radius: pinned 1.0, now 1.1"]


def test_the_golden_file_was_written_under_this_numbers_version():
    assert golden.load_golden()["numbers_version"] == medcert_core.NUMBERS_VERSION, REGENERATE


def test_a_planted_change_to_the_radius_fails_the_golden_statistics(monkeypatch):
    pinned = golden.load_golden()["numbers"]["statistics"]
    assert golden.differences(pinned, golden.statistics_numbers()) == []
    true_radius = certify_module.certified_radius
    monkeypatch.setattr(certify_module, "certified_radius", lambda sigma, tau: true_radius(sigma, tau) * (1 + 1e-5))
    moved = golden.differences(pinned, golden.statistics_numbers())
    assert any("/holm/radius" in problem for problem in moved)


def test_a_planted_change_to_the_noise_fails_the_golden_counts(monkeypatch):
    configuration = {0.5: ("none",)}
    pinned = {"sigma0.5_none": golden.load_golden()["numbers"]["smoothing"]["sigma0.5_none"]}
    with golden.one_thread():
        assert golden.differences(pinned, golden.smoothing_numbers(configuration)) == []
        true_draw = smoothing.draw_noise

        def louder_noise(*args, **kwargs):
            noise, generators = true_draw(*args, **kwargs)
            return noise * 1.02, generators

        monkeypatch.setattr(smoothing, "draw_noise", louder_noise)
        moved = golden.differences(pinned, golden.smoothing_numbers(configuration))
    assert any(problem.startswith("/sigma0.5_none/counts") for problem in moved), moved


def test_writing_moved_numbers_is_refused_until_the_version_is_bumped(tmp_path, monkeypatch):
    stored = golden.load_golden()
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(stored))
    moved = json.loads(json.dumps(stored["numbers"]))
    moved["statistics"]["holm"]["radius"] *= 1.01
    monkeypatch.setattr(golden, "golden_numbers", lambda: moved)
    with pytest.raises(ValueError, match="NUMBERS_VERSION is still"):
        golden.write_golden(path)
    assert json.loads(path.read_text()) == stored, "nothing written"
    monkeypatch.setattr(medcert_core, "NUMBERS_VERSION", stored["numbers_version"] + 1)
    assert golden.write_golden(path) == ["/statistics/holm/radius: pinned "
                                         f"{stored['numbers']['statistics']['holm']['radius']!r}, now "
                                         f"{moved['statistics']['holm']['radius']!r}"]
    assert json.loads(path.read_text()) == {"numbers_version": stored["numbers_version"] + 1, "numbers": moved}


def test_differences_name_the_place_and_respect_the_tolerance():
    assert golden.differences({"a": [1.0, 2.0]}, {"a": [1.0, 2.0 * (1 + 1e-8)]}) == []
    assert golden.differences({"a": [1.0, 2.0]}, {"a": [1.0, 2.001]}) == ["/a[1]: pinned 2.0, now 2.001"]
    assert golden.differences({"a": "x1"}, {"a": "x2", "b": 1}) == ["/b: new", "/a: pinned 'x1', now 'x2'"]
    assert golden.differences({"a": [1.0]}, {"a": [1.0, 2.0]}) == ["/a: pinned [1.0], now [1.0, 2.0]"]
