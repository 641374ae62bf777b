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


# --------------------------------------------------------------------------- certify: the noise seed


def noise_sensitive_checkpoint(path):
    """A tiny untrained 2-class segmenter (16 px) as ``medcert train`` writes it, its head's bias set so that
    the two classes tie on average under the noise: each draw's classes, hence the counts and p-values,
    depend on the noise (an untrained model alone certifies one class everywhere, whatever the seed)."""
    import dataclasses

    import torch

    from medcert_core.training import TrainConfig

    config = TrainConfig(arch="resunetpp", in_channels=3, num_classes=2, class_names=("background", "lung"),
                         image_size=(16, 16), model_kwargs={"base_channels": 4}, dataset="phantom")
    torch.manual_seed(0)
    model = config.build_model().eval()
    with torch.no_grad():
        noisy = 0.5 + 0.5 * torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        means = model(noisy).mean((0, 2, 3))
        model.head.bias[1] -= means[1] - means[0]
    torch.save({"config": dataclasses.asdict(config), "state_dict": model.state_dict()}, path)
    return path


def grey_png(path, shift=0):
    from PIL import Image

    yy, xx = np.mgrid[:32, :32]
    Image.fromarray(((xx * 5 + yy * 3 + shift) % 256).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def certify_cli(tmp_path, capsys, monkeypatch):
    """``certify(target, output_name, *extra)`` -> the printed summary; records each image's generator seed
    (``certify.generator_seeds``) and p-values (``certify.pvalues``)."""
    from medcert_core.smoothing import SmoothedSegmenter

    checkpoint = noise_sensitive_checkpoint(tmp_path / "model.pt")
    generator_seeds, pvalues = [], []
    original = SmoothedSegmenter.certify

    def recording(self, x, n0, n, *, generator=None, **options):
        generator_seeds.append(generator.initial_seed())
        certificate = original(self, x, n0, n, generator=generator, **options)
        pvalues.append(certificate.pvalues.cpu().numpy())
        return certificate

    monkeypatch.setattr(SmoothedSegmenter, "certify", recording)

    def certify(target, output, *extra):
        capsys.readouterr()
        main(["certify", str(target), "--checkpoint", str(checkpoint), "--sigma", "0.5", "--n", "60",
              "--output-dir", str(tmp_path / output), *map(str, extra)])
        return json.loads(capsys.readouterr().out)

    certify.generator_seeds, certify.pvalues = generator_seeds, pvalues
    return certify


def labels(summary):
    from PIL import Image

    return np.array(Image.open(summary["labels_png"]))


def test_certify_without_seed_draws_a_fresh_one_from_the_os_and_records_it(tmp_path, certify_cli):
    import hashlib

    from medcert_core.smoothing import image_seed

    image = grey_png(tmp_path / "chest.png")
    first, second = certify_cli(image, "one"), certify_cli(image, "two")
    assert first["seed_source"] == second["seed_source"] == "os-entropy"
    assert first["seed"] != second["seed"], "two runs without --seed draw different seeds"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    for summary in (first, second):
        assert summary["image_sha256"] == digest
        assert summary["noise_seed"] == image_seed(summary["seed"], digest)
        assert json.loads((tmp_path / ("one" if summary is first else "two") / "chest_certificate.json").read_text()) == summary
    assert certify_cli.generator_seeds == [first["noise_seed"], second["noise_seed"]], "the recorded seed is the one used"
    assert not np.array_equal(*certify_cli.pvalues), "other noise, other counts"


def test_certify_with_a_seed_reproduces_the_certificate(tmp_path, certify_cli):
    image = grey_png(tmp_path / "chest.png")
    drawn = certify_cli(image, "drawn")
    again = certify_cli(image, "again", "--seed", drawn["seed"])  # the recorded seed reproduces it
    assert again["seed_source"] == "given" and again["noise_seed"] == drawn["noise_seed"]
    assert np.array_equal(labels(again), labels(drawn))
    assert np.array_equal(certify_cli.pvalues[0], certify_cli.pvalues[1]), "the same counts, pixel by pixel"
    different = ("image", "labels_png", "overlay_png", "labels_native_png", "overlay_native_png", "legend_png",
                 "seed_source")
    assert {key: value for key, value in again.items() if key not in different} == \
        {key: value for key, value in drawn.items() if key not in different}
    fixed = [certify_cli(image, f"fixed{number}", "--seed", 7) for number in (1, 2)]
    assert fixed[0]["seed"] == fixed[1]["seed"] == 7 and np.array_equal(labels(fixed[0]), labels(fixed[1]))
    assert np.array_equal(certify_cli.pvalues[2], certify_cli.pvalues[3])
    assert not np.array_equal(certify_cli.pvalues[0], certify_cli.pvalues[2]), "another seed, other counts"


def test_certify_gives_each_file_of_a_folder_its_own_seed(tmp_path, certify_cli):
    import pandas as pd

    folder = tmp_path / "inputs"
    folder.mkdir()
    grey_png(folder / "a.png"), grey_png(folder / "b.png", shift=40)
    summaries = certify_cli(folder, "out")
    table = pd.read_csv(tmp_path / "out" / "certificates.csv")
    assert table["seed"].nunique() == 1 and table["seed"].iloc[0] == summaries[0]["seed"]
    assert table["noise_seed"].nunique() == 2, "two files of a folder get different noise"
    assert list(table["noise_seed"]) == [summary["noise_seed"] for summary in summaries]
    assert list(table["image_sha256"]) == [summary["image_sha256"] for summary in summaries]
    alone = certify_cli(folder / "b.png", "alone", "--seed", summaries[0]["seed"])  # as in the folder
    assert alone["noise_seed"] == summaries[1]["noise_seed"] and np.array_equal(labels(alone), labels(summaries[1]))
    assert np.array_equal(certify_cli.pvalues[2], certify_cli.pvalues[1])
    assert not np.array_equal(certify_cli.pvalues[0], certify_cli.pvalues[1]), "each file its own noise"


@pytest.mark.parametrize(("num_classes", "dtype", "abstain"), [(2, np.uint8, 255), (255, np.uint8, 255),
                                                               (256, np.uint16, 65535)])
def test_a_label_png_never_reads_abstain_as_a_class(tmp_path, num_classes, dtype, abstain):
    from PIL import Image

    from medcert_core import ABSTAIN
    from medcert_core.single_image import _label_png, _save_png, abstain_value

    labels = np.array([[0, num_classes - 1], [ABSTAIN, 1]])
    written = np.array(Image.open(_save_png(_label_png(labels, num_classes), tmp_path / "labels.png")))
    assert abstain_value(num_classes) == abstain
    assert written.tolist() == [[0, num_classes - 1], [abstain, 1]]
    assert written.dtype.itemsize == np.dtype(dtype).itemsize
    assert (written == abstain).sum() == 1, "the top class id is not the abstain value"
    with pytest.raises(ValueError, match="do not fit a label PNG"):
        abstain_value(70000)


def test_certifying_a_folder_again_skips_its_own_outputs(tmp_path, certify_cli):
    folder = tmp_path / "inputs"
    folder.mkdir()
    grey_png(folder / "a.png")
    first = certify_cli(folder, "inputs")  # outputs written next to the inputs
    assert (folder / "a_labels.png").is_file() and (folder / "a_overlay_native.png").is_file()
    again = certify_cli(folder, "inputs")
    assert [summary["image"] for summary in again] == [summary["image"] for summary in first] == [str(folder / "a.png")]
