"""Training: the loss, learning on phantoms, checkpoints that resume and refuse the wrong model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import medcert_core.training as training
from medcert_core.data import load_dataset
from medcert_core.training import dice_ce_loss, load_segmenter, train_segmenter


@pytest.fixture(scope="module")
def phantoms():
    options = {"image_size": 64, "num_images": 20, "seed": 3}
    return load_dataset("phantom", None, "train", **options), load_dataset("phantom", None, "val", **options)


def test_dice_ce_loss_against_a_direct_computation():
    logits = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 5, 4), generator=torch.Generator().manual_seed(1))
    probabilities = logits.softmax(1)
    dices = []
    for c in range(3):
        p, t = probabilities[:, c], (target == c).float()
        dices.append((2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    expected = F.cross_entropy(logits, target) + 1 - torch.stack(dices).mean()
    assert dice_ce_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert dice_ce_loss(perfect, target).item() < 0.01


def test_training_learns_and_checkpoint_resumes_bit_for_bit(phantoms, tmp_path, crash_on_second_save):
    train_set, val_set = phantoms
    settings = dict(arch="unet", epochs=3, batch_size=7, seed=1, progress=False, device="cpu",
                    model_kwargs={"encoder_name": "resnet18", "decoder_channels": (32, 16, 16, 8, 8)})
    uninterrupted, config, history = train_segmenter(train_set, val_set, **settings)
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert history["val_dice"].between(0, 1).all()
    assert config.class_names == ("background", "lung", "heart", "clavicle")
    assert (config.in_channels, config.num_classes, config.image_size) == (3, 4, (64, 64))
    assert (config.dataset, config.split) == ("phantom", "train")

    checkpoint = tmp_path / "model.pt"
    arm, disarm = crash_on_second_save
    arm(training)
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(train_set, val_set, checkpoint=checkpoint, **settings)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    disarm(training)
    resumed, _, resumed_history = train_segmenter(train_set, val_set, checkpoint=checkpoint, **settings)
    assert list(resumed_history["epoch"]) == [1, 2, 3]
    for (name, expected), actual in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, actual), f"{name} differs after resuming"

    loaded, loaded_config = load_segmenter(checkpoint, arch="unet", num_classes=4)
    assert loaded_config == config
    image = val_set[0][0][None]
    with torch.no_grad():
        assert torch.equal(loaded(image), uninterrupted.eval()(image))

    with pytest.raises(ValueError, match="holds a 'unet' model, not 'resunetpp'"):
        load_segmenter(checkpoint, arch="resunetpp")
    with pytest.raises(ValueError, match="4 classes"):
        load_segmenter(checkpoint, num_classes=2)
    with pytest.raises(ValueError, match="another config"):
        train_segmenter(train_set, val_set, checkpoint=checkpoint, **{**settings, "seed": 2})


def test_load_segmenter_explains_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_segmenter(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a medcert segmenter checkpoint"):
        load_segmenter(garbage)


def test_noise_augmentation_is_recorded(phantoms, tmp_path):
    train_set, val_set = phantoms
    _, config, _ = train_segmenter(
        train_set, val_set, arch="resunetpp", model_kwargs={"base_channels": 4}, epochs=1, noise_sigma=0.25,
        progress=False, device="cpu", checkpoint=tmp_path / "noisy.pt",
    )
    assert config.noise_sigma == 0.25
    _, loaded = load_segmenter(tmp_path / "noisy.pt")
    assert loaded.noise_sigma == 0.25 and loaded.arch == "resunetpp"


def test_epochs_without_improvement_counts_from_the_first_best_epoch():
    assert training.epochs_without_improvement([]) == 0
    assert training.epochs_without_improvement([0.5, 0.7, 0.6, 0.7]) == 2, "a tie is no improvement"
    assert training.epochs_without_improvement([0.1, 0.2, 0.3]) == 0


def test_patience_stops_when_validation_plateaus_keeps_the_best_epoch_and_resumes_stopped(phantoms, tmp_path,
                                                                                           monkeypatch):
    train_set, val_set = phantoms
    scores = iter([0.5, 0.6, 0.55, 0.6, 0.9, 0.95])  # best at epoch 2, then two epochs without a better one
    weights_at_epoch = []

    def scripted_dice(frame):
        return next(scores)

    def remember(model, *args, **kwargs):
        weights_at_epoch.append({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    evaluate = training.evaluate_segmenter
    monkeypatch.setattr(training, "mean_foreground_dice", scripted_dice)
    monkeypatch.setattr(training, "evaluate_segmenter", remember)
    settings = dict(arch="resunetpp", model_kwargs={"base_channels": 4}, epochs=6, patience=2, progress=False,
                    device="cpu", checkpoint=tmp_path / "stopped.pt")
    model, config, history = train_segmenter(train_set, val_set, **settings)
    assert list(history["epoch"]) == [1, 2, 3, 4] and config.patience == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights_at_epoch[1][name]), f"{name}: not the best (second) epoch's weights"
    again, _, history_again = train_segmenter(train_set, val_set, **settings)
    assert len(history_again) == 4, "a stopped checkpoint is loaded, not trained further"
    assert load_segmenter(tmp_path / "stopped.pt")[1].patience == 2
    with pytest.raises(ValueError, match="patience must be None"):
        train_segmenter(train_set, val_set, **{**settings, "patience": 0, "checkpoint": None})


def test_random_flips_move_image_and_mask_together_and_only_when_asked():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 2, 5, 7, generator=generator)
    masks = torch.randint(0, 3, (64, 5, 7), generator=generator)
    flipped, flipped_masks = training.random_flips(images, masks, torch.Generator().manual_seed(1))
    kinds = []
    for image, mask, new_image, new_mask in zip(images, masks, flipped, flipped_masks):
        matches = [dims for dims in ((), (-1,), (-2,), (-2, -1))
                   if torch.equal(new_image, image.flip(dims) if dims else image)]
        assert len(matches) == 1
        dims = matches[0]
        assert torch.equal(new_mask, mask.flip(dims) if dims else mask), "the mask flips with its image"
        kinds.append(dims)
    assert len(set(kinds)) == 4, "all four flip combinations occur in 64 draws"
    plain, plain_masks = training.augment_batch(images, masks, torch.Generator().manual_seed(2))
    again, again_masks = training.augment_batch(images, masks, torch.Generator().manual_seed(2), flips=False)
    assert torch.equal(plain, again) and torch.equal(plain_masks, again_masks), "no flips by default"
