"""The command line end to end on the embedded phantoms (tiny sizes)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from medcert_core.__main__ import main


@pytest.mark.slow
def test_certify_writes_a_label_map_an_overlay_and_a_summary(tmp_path, capsys):
    from PIL import Image

    from medcert_core.data import load_dataset

    checkpoint = tmp_path / "model.pt"
    main(["train", "--dataset", "phantom", "--image-size", "32", "--epochs", "1", "--checkpoint", str(checkpoint)])
    image, _ = load_dataset("phantom", None, "test", image_size=48)[0]
    image_path = tmp_path / "chest.png"
    Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(image_path)  # grey, 48 px: converted
    capsys.readouterr()
    main(["certify", str(image_path), "--checkpoint", str(checkpoint), "--sigma", "0.25", "--n", "60",
          "--output-dir", str(tmp_path / "out")])
    summary = json.loads(capsys.readouterr().out)
    labels = np.array(Image.open(tmp_path / "out" / "chest_labels.png"))
    overlay = np.array(Image.open(tmp_path / "out" / "chest_overlay.png"))
    assert labels.shape == (32, 32) and overlay.shape == (32, 32, 3)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 255}
    abstained = labels == 255
    assert summary["abstain_fraction"] == pytest.approx(abstained.mean())
    assert (overlay[abstained] == 255).all(), "abstained pixels are white in the overlay"
    assert summary["radius"] == pytest.approx(0.25 * 0.6744897501960817)
    assert summary["input_space"] == "[0, 1]^(3x32x32)"
    assert json.loads((tmp_path / "out" / "chest_certificate.json").read_text()) == summary
    # at the image file's own resolution: the same labels, resized by nearest neighbour
    assert summary["certified_input_size"] == [32, 32] and summary["image_file_size"] == [48, 48]
    native = np.array(Image.open(tmp_path / "out" / "chest_labels_native.png"))
    assert native.shape == (48, 48) and np.array(Image.open(summary["overlay_native_png"])).shape == (48, 48, 3)
    rows, columns = (np.floor((np.arange(48) + 0.5) * 32 / 48).astype(int),) * 2  # nearest-exact sources
    assert np.array_equal(native, labels[np.ix_(rows, columns)])

    # a folder: one JSON per image file and a CSV summary; other files are ignored
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(folder / "a.png")
    Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).convert("RGB").save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    main(["certify", str(folder), "--checkpoint", str(checkpoint), "--sigma", "0.25", "--n", "60",
          "--output-dir", str(tmp_path / "folder_out")])
    table = __import__("pandas").read_csv(tmp_path / "folder_out" / "certificates.csv")
    assert sorted(table["image"].map(lambda text: text.rsplit("/", 1)[-1])) == ["a.png", "b.jpg"]
    assert {"abstain_fraction", "certified_lung", "radius"} <= set(table.columns)
    for stem in ("a", "b"):
        assert (tmp_path / "folder_out" / f"{stem}_certificate.json").is_file()

    # a multi-step DDPM draws its own noise: the seed decides it, the batch size does not
    from medcert_core.data import load_dataset as load
    from medcert_core.denoisers import train_ddpm

    ddpm = train_ddpm(load("phantom", None, "train", image_size=32, num_images=8), tmp_path / "ddpm", steps=2,
                      batch_size=2, image_size=32, max_sigma=0.5, progress=False, device="cpu")
    maps = []
    for seed, batch_size in ((3, 7), (3, 32)):
        output = tmp_path / f"multi_{seed}_{batch_size}"
        main(["certify", str(image_path), "--checkpoint", str(checkpoint), "--sigma", "0.25", "--n", "60",
              "--denoiser", f"ddpm:{ddpm}", "--steps", "3", "--seed", str(seed), "--batch-size", str(batch_size),
              "--output-dir", str(output)])
        maps.append(np.array(Image.open(output / "chest_labels.png")))
    assert np.array_equal(maps[0], maps[1]), "same seed, other batch size: the same certificate"


def test_grid_names_a_bad_grid_file(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("runs:\n  - notebook: no_such_chapter\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", str(grid)])
    assert exit_info.value.code == 2
    assert re.search(r"no notebook 'no_such_chapter'.*phantom", capsys.readouterr().err)


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
