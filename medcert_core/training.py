"""Training of segmentation models: Dice + cross-entropy, Adam, optional Gaussian noise.

``train_segmenter`` trains a ``create_model`` architecture on a (image, mask) dataset, keeps the
weights with the best validation Dice, and writes a checkpoint after every epoch (atomically) that
stores its config (arch, classes, input size, noise sigma, dataset, split); rerunning with the same
checkpoint path resumes. ``load_segmenter`` rebuilds the model from a checkpoint alone.

Noise augmentation adds N(0, sigma^2) to the [0, 1] input, the same space the certificate uses;
the SegCertify baseline is trained with sigma = 0.25, the paper's own models with none.

Images (C, H, W) train the 2D architectures, volumes (C, D, H, W) the volumetric ones
(``models.VOLUME_ARCHITECTURES``: a 3D U-Net, or a 2D architecture applied slice by slice, trained end
to end on the volumes); the other pairings are refused. Volumes get no geometric augmentation
(contrast and brightness only, flips when asked), and their validation Dice counts only the real
voxels where the dataset knows them (``real_voxels``), not the padding.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # text bars: no widget output in executed chapters

from medcert_core.devices import autocast, resolve_device, resolve_precision
from medcert_core.io import UnsafeFileError, error_gist, load_weights, save_torch_atomically
from medcert_core.metrics import MetricAccumulator
from medcert_core.models import IMAGE_ARCHITECTURES, SLICEWISE, VOLUME_ARCHITECTURES, create_model, model_capacity
from medcert_core.smoothing import classes_from_logits

PRESETS: dict[str, dict[str, Any]] = {
    # minutes on 2 CPU cores at 64 to 128 px: the embedded default
    "tiny": {"epochs": 30, "batch_size": 8, "lr": 2e-3, "model_kwargs": {
        "unet": {"encoder_name": "resnet18", "decoder_channels": (128, 64, 32, 16, 8)},
        "resunetpp": {"base_channels": 8},
        "deeplabv2": {"backbone": "resnet18"},
        "unet3d": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2},  # 1.2 M weights
    }},
    # the tiny widths at matched capacity (2.3-3.6 M weights, 0.9-2.2 GMACs per 128 px image; tiny's are
    # 1.0-12.5 M): the ResNet-18 trunks without their last stage, ResUNet++ at 12 base channels
    "matched": {"epochs": 30, "batch_size": 8, "lr": 2e-3, "model_kwargs": {
        "unet": {"encoder_name": "resnet18", "encoder_depth": 4, "decoder_channels": (128, 64, 32, 16)},
        "resunetpp": {"base_channels": 12},
        "deeplabv2": {"backbone": "resnet18", "backbone_stages": 3},
        "unet3d": {"channels": (24, 48, 96, 192), "strides": (2, 2, 2), "num_res_units": 2},  # 2.7 M weights
    }},
    # the paper's sizes, for a GPU
    "paper": {"epochs": 100, "batch_size": 8, "lr": 1e-4, "model_kwargs": {
        "unet": {"encoder_name": "resnet34"},
        "resunetpp": {},
        "deeplabv2": {"backbone": "resnet101"},
        # the paper has no 3D model: the widths of MONAI's spleen tutorial U-Net (4.8 M weights)
        "unet3d": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2},
    }},
}
# "<arch>-slicewise" (a 2D architecture on every slice of a volume) takes the widths of <arch>


def preset_capacity(preset: str, arch: str, *, in_channels: int = 3, num_classes: int = 4,
                    size: tuple[int, ...] = (128, 128)) -> dict[str, int]:
    """{"parameters", "macs"} of ``arch`` at ``preset``'s widths: its weights, and the multiply-accumulates of
    one forward pass on one (in_channels, *size) image, or volume for a size (D, H, W)."""
    return model_capacity(preset_model(preset, arch, in_channels, num_classes), (1, in_channels, *size))


def preset_model_kwargs(preset: str, arch: str) -> dict[str, Any]:
    """The builder kwargs of ``arch`` at ``preset``'s widths (those of its 2D arch for a slice-wise one)."""
    return dict(PRESETS[preset]["model_kwargs"].get(SLICEWISE.get(arch, arch), {}))


def preset_model(preset: str, arch: str, in_channels: int = 3, num_classes: int = 4) -> torch.nn.Module:
    """An untrained ``arch`` at ``preset``'s widths."""
    return create_model(arch, in_channels, num_classes, **preset_model_kwargs(preset, arch))


@dataclass
class TrainConfig:
    """Everything that defines a trained segmenter; stored in its checkpoint."""

    arch: str
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]
    image_size: tuple[int, ...]  # (H, W) of images, (D, H, W) of volumes
    noise_sigma: float = 0.0
    epochs: int = 30
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0
    augment: bool = True
    flips: bool = False  # with augment: random left-right and up-down flips (not for anatomy with a side)
    patience: int | None = None  # stop after this many epochs without a better validation Dice; None: all epochs
    preset: str = "tiny"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""
    split: str = "train"
    precision: str = "fp32"  # autocast of the forward pass in training (fp32 master weights): fp32 | bf16 | fp16

    def build_model(self) -> torch.nn.Module:
        return create_model(self.arch, self.in_channels, self.num_classes, **self.model_kwargs)

    def record(self) -> dict[str, Any]:
        """The config as its checkpoint stores it; ``precision``, ``flips`` and ``patience`` named only when
        not their defaults, so checkpoints written before they existed still resume and load."""
        record = dataclasses.asdict(self)
        for name, default in (("precision", "fp32"), ("flips", False), ("patience", None)):
            if record[name] == default:
                record.pop(name)
        return record


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus (1 - mean soft Dice over classes). logits (B,K,*spatial), target (B,*spatial):
    (B,K,H,W) and (B,H,W) for images, (B,K,D,H,W) and (B,D,H,W) for volumes."""
    probabilities = logits.softmax(1)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
    summed = (0, *range(2, logits.dim()))  # the batch and every spatial axis
    intersection = (probabilities * one_hot).sum(summed)
    total = probabilities.sum(summed) + one_hot.sum(summed)
    soft_dice = (2 * intersection + 1.0) / (total + 1.0)
    return F.cross_entropy(logits, target) + 1 - soft_dice.mean()


def augment_batch(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
                  flips: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale (0.9-1.1), shift (+-6 %), rotation (+-8 degrees), contrast and brightness; with
    ``flips`` also a left-right and an up-down flip, each with probability 1/2 (colonoscopy, skin; never
    chest X-rays, whose left and right are anatomy).

    images (B,C,H,W), masks (B,H,W); the mask follows the same affine map (nearest). Volumes (B,C,D,H,W)
    with masks (B,D,H,W) get no affine map (voxels are often anisotropic; the padding would move): only
    the flips (of H and W) when asked, contrast and brightness.
    """
    if flips:
        images, masks = random_flips(images, masks, generator)
    if images.dim() == 4:
        images, masks = random_affine(images, masks, generator)
    return random_intensity(images, generator), masks


def _uniform(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count,) float32 uniform in [low, high)."""
    return low + (high - low) * torch.rand(count, generator=generator)


def random_affine(images: torch.Tensor, masks: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image (B,C,H,W) and its mask (B,H,W) scaled (0.9-1.1), shifted (+-6 %) and rotated (+-8 degrees)
    about its centre; bilinear for the image, nearest for the mask, borders replicated."""
    batch = images.shape[0]
    uniform = lambda low, high: _uniform(low, high, batch, generator)  # noqa: E731
    angle = uniform(-8, 8) * torch.pi / 180
    scale = uniform(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, uniform(-0.06, 0.06)], 1), torch.stack([sin, cos, uniform(-0.06, 0.06)], 1)], 1
    ).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    masks = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    return images, masks[:, 0].long()


def per_item(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped (B, 1, ...) to broadcast over a batch ``like`` (B, ...)."""
    return values.reshape(-1, *(1,) * (like.dim() - 1))


def random_intensity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image (B,C,*spatial) with its contrast about its mean scaled by 0.85-1.15 and its brightness
    shifted by +-0.08, clamped to [0, 1]."""
    batch = images.shape[0]
    contrast = per_item(_uniform(0.85, 1.15, batch, generator).to(images), images)
    brightness = per_item(_uniform(-0.08, 0.08, batch, generator).to(images), images)
    mean = images.mean(tuple(range(1, images.dim())), keepdim=True)
    return ((images - mean) * contrast + mean + brightness).clamp(0, 1)


def random_flips(images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image (B,C,*spatial) and its mask (B,*spatial) flipped left-right (W), and independently up-down
    (H), with probability 1/2 each."""
    for image_dim, draws in ((-1, torch.rand(images.shape[0], generator=generator) < 0.5),
                             (-2, torch.rand(images.shape[0], generator=generator) < 0.5)):
        images = torch.where(per_item(draws, images), images.flip(image_dim), images)
        masks = torch.where(per_item(draws, masks), masks.flip(image_dim), masks)
    return images, masks


def epochs_without_improvement(val_dice: Sequence[float]) -> int:
    """Epochs since the best validation Dice (the first epoch that reached it): 0 when the last is the best."""
    if not len(val_dice):
        return 0
    return len(val_dice) - 1 - int(np.argmax(val_dice))


@torch.inference_mode()
def predict_batch(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Plain (unsmoothed) class ids (B,*spatial) of a (B,C,*spatial) batch."""
    return classes_from_logits(model(images))


def evaluate_segmenter(
    model: torch.nn.Module,
    dataset: Dataset,
    class_names: Sequence[str],
    *,
    noise_sigma: float = 0.0,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-image, per-class plain Dice/IoU on a dataset (optionally on one noisy copy per image); over the
    real voxels only where the dataset says which they are (``dataset.real_voxels(i)``, a padded volume
    dataset's), else over every pixel."""
    device = resolve_device(device)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    accumulator = MetricAccumulator(class_names)
    real_voxels = getattr(dataset, "real_voxels", None)
    index = 0
    for images, masks in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if noise_sigma > 0:
            images = images + noise_sigma * torch.randn(images.shape, generator=generator)
        for labels, mask in zip(predict_batch(model, images.to(device)).cpu(), masks):
            valid = real_voxels(index) if real_voxels is not None else None
            accumulator.add(labels, mask, image_id=index, valid=valid)
            index += 1
    return accumulator.to_frame()


def mean_foreground_dice(frame: pd.DataFrame) -> float:
    """Mean over foreground classes of the per-image mean Dice."""
    foreground = frame[frame["class_id"] > 0]
    return float(foreground.groupby("class_id")["dice"].mean().mean())


def _config_from_dataset(dataset: Dataset, arch: str, preset: str, **overrides: Any) -> TrainConfig:
    image, _ = dataset[0]
    settings = {key: value for key, value in PRESETS[preset].items() if key != "model_kwargs"}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    model_kwargs = preset_model_kwargs(preset, arch)
    model_kwargs.update(settings.pop("model_kwargs", None) or {})
    class_names = tuple(dataset.class_names)
    return TrainConfig(
        arch=arch,
        in_channels=int(image.shape[0]),
        num_classes=len(class_names),
        class_names=class_names,
        image_size=tuple(int(length) for length in image.shape[1:]),
        preset=preset,
        model_kwargs=model_kwargs,
        dataset=str(getattr(dataset, "name", "")),
        split=str(getattr(dataset, "split", "")),
        **settings,
    )


@dataclass
class _Training:
    """The state of a training run that a checkpoint stores beside its config."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # shuffling, augmentation and noise
    history: list[dict[str, float]]
    best: dict[str, Any]  # "dice": best validation Dice so far, "state_dict": its weights
    epoch: int = 0  # epochs done


def _start_training(config: TrainConfig, device: torch.device) -> _Training:
    """A fresh model (torch's global seed set to config.seed first), Adam with a cosine schedule over the
    epochs, and the run's generator seeded with config.seed."""
    torch.manual_seed(config.seed)
    model = config.build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    return _Training(model, optimizer, scheduler, generator, [],
                     {"dice": -1.0, "state_dict": copy.deepcopy(model.state_dict())})


def _resume(state: _Training, path: Path, config: TrainConfig, device: torch.device) -> None:
    """Load a checkpoint of the same config into ``state``; ValueError for one of another config."""
    saved = load_weights(path, map_location=device)
    if saved["config"] != config.record():
        raise ValueError(
            f"checkpoint {path} was trained with another config; remove it or choose another path.\n"
            f"  saved:     {saved['config']}\n  requested: {config.record()}"
        )
    state.model.load_state_dict(saved["last_state_dict"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.generator.set_state(saved["generator"])
    state.history = saved["history"]
    state.best = {"dice": saved["best_val_dice"], "state_dict": saved["state_dict"]}
    state.epoch = saved["epoch"]


def _checkpoint(state: _Training, config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint holds after ``state.epoch`` epochs: the config, the best and the last weights,
    the optimizer, schedule and generator states, the history."""
    return {
        "config": config.record(),
        "state_dict": state.best["state_dict"],
        "best_val_dice": state.best["dice"],
        "last_state_dict": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "generator": state.generator.get_state(),
        "history": state.history,
        "epoch": state.epoch,
    }


def _train_epoch(state: _Training, train_set: Dataset, config: TrainConfig, device: torch.device) -> float:
    """One pass over train_set in a random order, in batches (B, C, *spatial): augmentation, then noise
    N(0, noise_sigma^2), then one Adam step on the Dice + cross-entropy loss (the forward pass under
    autocast at ``config.precision``, the loss and the weights in fp32); the schedule steps once.
    Returns the mean batch loss."""
    state.model.train()
    losses = []
    order = torch.randperm(len(train_set), generator=state.generator).tolist()
    for start in range(0, len(order), config.batch_size):
        items = [train_set[i] for i in order[start : start + config.batch_size]]
        images = torch.stack([image for image, _ in items])
        masks = torch.stack([mask for _, mask in items])
        if config.augment:
            images, masks = augment_batch(images, masks, state.generator, flips=config.flips)
        if config.noise_sigma > 0:
            images = images + config.noise_sigma * torch.randn(images.shape, generator=state.generator)
        with autocast(device, config.precision):
            logits = state.model(images.to(device))
        loss = dice_ce_loss(logits.float(), masks.to(device))
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        losses.append(loss.item())
    state.scheduler.step()
    return float(np.mean(losses))


def check_architecture_fits(arch: str, dataset: Dataset) -> None:
    """Refuse a 2D architecture on volumes (C, D, H, W) and a volumetric one on images (C, H, W), naming the
    architectures that fit; a name that is neither is left to ``create_model``'s error."""
    shape = tuple(dataset[0][0].shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"segmenters train on images (C, H, W) or volumes (C, D, H, W); this dataset gives items "
                         f"of shape {shape}")
    if len(shape) == 4:
        given, kind, fitting, other = "volumes (C, D, H, W)", "volumetric", VOLUME_ARCHITECTURES, IMAGE_ARCHITECTURES
    else:
        given, kind, fitting, other = "images (C, H, W)", "2D", IMAGE_ARCHITECTURES, VOLUME_ARCHITECTURES
    if arch in other:
        raise ValueError(f"architecture {arch!r} does not fit this dataset, which gives {given} of shape {shape}; "
                         f"{kind} architectures: {', '.join(fitting)}")


def train_segmenter(
    train_set: Dataset,
    val_set: Dataset,
    *,
    arch: str = "unet",
    preset: str = "tiny",
    noise_sigma: float = 0.0,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    augment: bool = True,
    flips: bool = False,
    patience: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    progress: bool = True,
) -> tuple[torch.nn.Module, TrainConfig, pd.DataFrame]:
    """Train a segmenter; returns (model with the best validation weights, config, history).

    ``precision``: autocast of the forward pass (fp32 | bf16 | fp16 | auto, resolved for the device and
    recorded in the config); the weights, the optimizer and the loss stay fp32.

    train_set / val_set: datasets of (image (C,H,W) in [0,1], mask (H,W) int64) with ``.class_names``
    for a 2D ``arch``, of (volume (C,D,H,W), mask (D,H,W)) for a volumetric one (see the module doc).
    ``epochs`` is the most epochs (the cosine schedule's length); with ``patience``
    training stops after that many epochs without a better validation Dice. The weights returned are
    the best validation epoch's. With ``checkpoint``, the state is saved after every epoch and an
    existing checkpoint of the same config is resumed (a finished one is simply loaded).
    """
    check_architecture_fits(arch, train_set)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    device = resolve_device(device)
    config = _config_from_dataset(
        train_set, arch, preset, noise_sigma=noise_sigma, epochs=epochs, batch_size=batch_size, lr=lr,
        seed=seed, augment=augment, flips=flips, patience=patience, model_kwargs=model_kwargs,
        precision=resolve_precision(precision, device),
    )
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be None (train every epoch) or >= 1 epochs, got {patience}")
    state = _start_training(config, device)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        _resume(state, path, config, device)
    epochs_bar = tqdm(range(state.epoch, config.epochs), desc=f"train {arch}", disable=not progress)
    for epoch in epochs_bar:
        if config.patience is not None and epochs_without_improvement(
                [row["val_dice"] for row in state.history]) >= config.patience:
            break  # converged: no better validation Dice for ``patience`` epochs
        loss = _train_epoch(state, train_set, config, device)
        val_dice = mean_foreground_dice(
            evaluate_segmenter(state.model, val_set, config.class_names, noise_sigma=config.noise_sigma, device=device)
        )
        state.history.append({"epoch": epoch + 1, "loss": loss, "val_dice": val_dice})
        if val_dice > state.best["dice"]:
            state.best = {"dice": val_dice, "state_dict": copy.deepcopy(state.model.state_dict())}
        epochs_bar.set_postfix(loss=f"{loss:.3f}", val_dice=f"{val_dice:.3f}")
        state.epoch = epoch + 1
        if path is not None:
            save_torch_atomically(_checkpoint(state, config), path)
    state.model.load_state_dict(state.best["state_dict"])
    return state.model.eval(), config, pd.DataFrame(state.history)


def load_segmenter(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, TrainConfig]:
    """Rebuild a trained segmenter from its checkpoint (``~`` expanded); arch / num_classes, when given, must
    match it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no segmenter checkpoint at {path}")
    saved = _read_checkpoint(path, device)
    try:
        config = TrainConfig(**saved["config"])
        state_dict = saved["state_dict"]
    except Exception as error:  # a foreign file
        raise ValueError(f"{path} is not a medcert segmenter checkpoint written by `medcert train` ({error!r})") from error
    config.class_names = tuple(config.class_names)
    config.image_size = tuple(config.image_size)
    if arch is not None and arch != config.arch:
        raise ValueError(f"{path} holds a {config.arch!r} model, not {arch!r}")
    if num_classes is not None and num_classes != config.num_classes:
        raise ValueError(f"{path} holds a model with {config.num_classes} classes {config.class_names}, not {num_classes}")
    model = config.build_model()
    mismatch = weights_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise ValueError(f"the weights in {path} do not fit the {config.arch!r} model with {config.num_classes} classes "
                         f"that its config describes: {mismatch}")
    model.load_state_dict(state_dict)
    return model.to(device).eval(), config


def _read_checkpoint(path: Path, device: str | torch.device) -> dict[str, Any]:
    """A checkpoint's content (tensors and plain containers only, see ``io.load_weights``): ValueError
    naming ``path`` for a file that needs code to unpickle, is unreadable or is not a dict."""
    try:
        saved = load_weights(path, map_location=device)
    except UnsafeFileError:
        raise
    except ValueError as error:  # a foreign or truncated file
        raise ValueError(f"{path} is not a medcert segmenter checkpoint written by `medcert train` "
                         f"({error_gist(error.__cause__ or error)})") from error
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a medcert segmenter checkpoint written by `medcert train` "
                         f"(it holds a {type(saved).__name__}, not a dict with 'config' and 'state_dict')")
    return saved


def weights_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str:
    """How ``found`` weights differ from a model's ``expected`` state dict ("" when they fit)."""
    shapes = {key: tuple(getattr(value, "shape", ())) for key, value in found.items()}
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [f"{key} {shapes[key]} instead of {tuple(value.shape)}" for key, value in expected.items()
                if key in shapes and shapes[key] != tuple(value.shape)]
    groups = (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
    return "; ".join(f"{len(items)} weights {label} (first: {items[0]})" for label, items in groups if items)
