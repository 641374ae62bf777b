"""The command line end to end on the embedded phantoms (tiny sizes)."""

from __future__ import annotations

import json

import pytest

from medcert_core.__main__ import main


@pytest.mark.slow
def test_demo_certifies_and_prints_a_table(tmp_path, capsys):
    main(["demo", "--image-size", "64", "--epochs", "2", "--images", "1", "--n", "100", "--cache", str(tmp_path)])
    output = capsys.readouterr().out
    assert "radius R = 0.169" in output
    for class_name in ("lung", "heart", "clavicle"):
        assert class_name in output
    assert (tmp_path / "demo_unet_sigma0.25.pt").is_file()


@pytest.mark.slow
def test_train_then_evaluate_writes_results(tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    results = tmp_path / "results.json"
    common = ["--dataset", "phantom", "--image-size", "64"]
    main(["train", *common, "--arch", "deeplabv2", "--epochs", "1", "--checkpoint", str(checkpoint)])
    main(["evaluate", *common, "--checkpoint", str(checkpoint), "--results", str(results)])
    main(["evaluate", *common, "--checkpoint", str(checkpoint), "--results", str(results)])
    entries = json.loads(results.read_text())
    assert len(entries) == 1, "re-evaluating a checkpoint replaces its entry"
    assert entries[0]["arch"] == "deeplabv2" and entries[0]["image_size"] == [64, 64]
    assert set(entries[0]["test_dice"]) == {"background", "lung", "heart", "clavicle"}
    assert all(0 <= value <= 1 for value in entries[0]["test_dice"].values())


def test_unknown_dataset_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "nope", "--checkpoint", "x.pt"])
    assert "invalid choice" in capsys.readouterr().err
