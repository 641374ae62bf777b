"""Segmenters medcert did not train: a TorchScript file, a ``torch.export`` program (``.pt2``) or a
Python entry point ``package.module:function`` returning an ``nn.Module``.

The base model f of the certificate is the module as loaded, with an optional per-channel
normalisation ``(x - mean) / std`` in front of it (:class:`Normalized`): the noise is added to the
[0, 1] image, then normalised, as DESIGN.md requires, so the radius is measured in the [0, 1] scale.

What each form runs:

- TorchScript (``torch.jit.save``): torch's own loader rebuilds a graph of torch operators; no Python
  code of the file runs.
- ``torch.export`` (``.pt2``): its tensors are checked to load with ``weights_only=True`` before
  ``torch.export.load`` runs (that function falls back to a full pickle otherwise, which can run
  code); a file that needs the fallback is refused. Its input shape is read from the program.
- ``package.module:function``: imports and calls your own code, with ``kwargs`` as keyword arguments.
  Only give an entry point you trust, as with any Python import.

A file saved with ``torch.save(model)`` (a pickled module) is refused: loading it needs a full
pickle; export it (``torch.jit.trace`` / ``torch.jit.script`` / ``torch.export``) or give an entry point.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
MODEL_FORMS = "a TorchScript file (torch.jit.save), a torch.export program (.pt2) or package.module:function"


@dataclass
class ExternalSegmenter:
    """What ``certify`` needs to know about a segmenter it did not train (the fields of a TrainConfig it reads)."""

    source: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: tuple[str, ...]
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    form: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """The JSON record of the model: its source, form, sizes and normalisation."""
        return {"model": self.source, "model_form": self.form, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "image_size": list(self.image_size),
                "normalize": None if self.normalize is None else {"mean": list(self.normalize[0]),
                                                                   "std": list(self.normalize[1])}}


class Normalized(torch.nn.Module):
    """``model((x - mean) / std)`` with per-channel mean and std: (B, C, H, W) in [0, 1] -> the model's logits."""

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


class ExportedModule(torch.nn.Module):
    """A ``torch.export`` program's module behind a plain ``nn.Module``: the program has no train / eval
    modes (its graph is fixed at export), so ``.eval()`` on the wrapper leaves it alone. A program
    exported with a fixed batch size (``batch``) is called on chunks of that size; export with a
    dynamic batch dimension (``dynamic_shapes``) for one call per batch of draws."""

    def __init__(self, program_module: torch.nn.Module, batch: int | None = None):
        super().__init__()
        object.__setattr__(self, "program", program_module)  # not a child: eval() would refuse it
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None or x.shape[0] == self.batch:
            return self.program(x)
        if x.shape[0] % self.batch:
            raise ValueError(f"the torch.export program takes batches of exactly {self.batch}; got {x.shape[0]}: "
                             f"use a batch size that is a multiple of {self.batch}, or export with a dynamic batch")
        return torch.cat([self.program(chunk) for chunk in x.split(self.batch)])

    def _apply(self, fn, recurse=True):
        self.program._apply(fn, recurse)
        return self


def parse_normalize(text: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``MEAN,STD`` (one pair for every channel) or ``M1,M2,M3,S1,S2,S3`` -> (means, stds) of length ``channels``."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        values = [values[0]] * channels + [values[1]] * channels
    if len(values) != 2 * channels or not all(torch.isfinite(torch.tensor(values))) or min(values[channels:]) <= 0:
        raise ValueError(f"--normalize {text!r}: expected MEAN,STD or {channels} means then {channels} stds, "
                         f"comma-separated, every std > 0 (e.g. 0.485,0.456,0.406,0.229,0.224,0.225 for 3 channels)")
    return tuple(values[:channels]), tuple(values[channels:])


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs`` JSON object -> dict; ValueError showing the text."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-kwargs {text!r} is not JSON ({error}); e.g. '{{\"in_channels\": 1}}'") from error
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs must be a JSON object (keyword arguments), not {type(value).__name__}")
    return value


def load_model(spec: str, *, kwargs: dict[str, Any] | None = None, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, str, tuple[int, ...] | None]:
    """A segmenter from a file or an entry point -> (module in eval mode, form, input shape or None).

    The input shape (B, C, H, W) is known for a ``torch.export`` program, else None.
    """
    path = Path(spec)
    if path.is_file():
        if kwargs:
            raise ValueError(f"--model-kwargs applies to a Python entry point, not to the file {path}")
        if _is_export_program(path):
            module, shape = _load_export_program(path, device)
            return module, "torch.export", shape
        return _load_torchscript(path, device), "torchscript", None
    if ENTRY_POINT.fullmatch(spec):
        return _call_entry_point(spec, kwargs or {}).to(device).eval(), "entry point", None
    raise FileNotFoundError(f"--model {spec!r}: no such file, and not an entry point package.module:function; "
                            f"expected {MODEL_FORMS}")


def _is_export_program(path: Path) -> bool:
    """A zip written by ``torch.export.save`` (the pt2 archive, or the older format of torch 2.7)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(("/archive_format", "serialized_exported_program.json")) or name == "archive_format"
                   for name in archive.namelist())


def _pickled_payloads(archive: zipfile.ZipFile) -> tuple[list[str], list[str]]:
    """(members torch.export.load would unpickle, members it would unpickle as arbitrary objects).

    The first list: ``.pt`` members (sample inputs, the older format's state) and the weights or
    constants their configs mark ``use_pickle``; the second: custom and opaque object constants.
    """
    names = archive.namelist()
    pickled = [name for name in names if name.endswith(".pt")]
    objects = []
    for config_name in (name for name in names if name.endswith("_config.json") and "/data/" in f"/{name}"):
        folder = config_name.rsplit("/", 1)[0]
        for entry in json.loads(archive.read(config_name)).get("config", {}).values():
            member = f"{folder}/{entry.get('path_name', '')}"
            if entry.get("path_name", "").startswith(("custom_obj", "opaque")):
                objects.append(member)
            elif entry.get("use_pickle"):
                pickled.append(member)
    return pickled, objects


def _load_torchscript(path: Path, device: str | torch.device) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as error:
        names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
        if any(name.endswith("data.pkl") for name in names) and not any("/code/" in name for name in names):
            raise ValueError(f"{path} is a torch.save file (a pickle), not a TorchScript or torch.export model: a "
                             f"pickled module can only be loaded by running code from the file, which medcert "
                             f"refuses. A medcert checkpoint goes to --checkpoint; otherwise export the model "
                             f"(torch.jit.trace / torch.jit.script + torch.jit.save, or torch.export.save) or "
                             f"give --model package.module:function") from error
        raise ValueError(f"cannot load {path} as a model: expected {MODEL_FORMS} ({error})") from error


def _load_export_program(path: Path, device: str | torch.device) -> tuple[torch.nn.Module, tuple[int, ...] | None]:
    """Check every tensor payload with weights_only, then ``torch.export.load`` the same bytes."""
    content = path.read_bytes()  # one read: the bytes checked are the bytes loaded
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        pickled, objects = _pickled_payloads(archive)
        if objects:
            raise ValueError(f"{path} holds Python objects as constants ({', '.join(objects)}): loading them would "
                             f"run code from the file; medcert refuses it")
        for name in pickled:
            try:
                torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(f"{path}: its part {name} does not load as plain tensors (weights only), so "
                                 f"loading it would run code from the file; medcert refuses it ({error})") from error
    try:
        program = torch.export.load(io.BytesIO(content))
    except Exception as error:
        raise ValueError(f"cannot load {path} as a torch.export program ({error})") from error
    shapes = [tuple(node.meta["val"].shape) for node in program.graph.nodes
              if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
              and "val" in node.meta]
    shape = shapes[0] if len(shapes) == 1 and len(shapes[0]) == 4 else None
    batch = shape[0] if shape is not None and isinstance(shape[0], int) else None
    module = ExportedModule(program.module().to(device), batch)
    if shape is None or not all(isinstance(size, int) for size in shape[1:]):
        return module, None
    return module, (batch or 0, *(int(size) for size in shape[1:]))


def _call_entry_point(spec: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    module_name, function_name = spec.split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {spec}: cannot import {function_name} from {module_name} ({error}); the module "
                         f"must be importable (installed, or on PYTHONPATH)") from error
    try:
        model = function(**kwargs)
    except TypeError as error:
        raise ValueError(f"--model {spec}: calling it with --model-kwargs {kwargs} failed ({error})") from error
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def probe_num_classes(model: torch.nn.Module, in_channels: int, image_size: tuple[int, int],
                      device: str | torch.device) -> int:
    """K read from one forward pass on a zero image (1, C, H, W); ValueError with the model's error."""
    try:
        with torch.inference_mode():
            logits = model(torch.zeros(1, in_channels, *image_size, device=device))
    except Exception as error:
        raise ValueError(f"the model fails on an input of shape (1, {in_channels}, {image_size[0]}, {image_size[1]}) "
                         f"({error}); check --in-channels and --image-size") from error
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model returns {shape} for a (1, {in_channels}, {image_size[0]}, {image_size[1]}) "
                         f"input; a segmenter must return logits (B, K, H, W)")
    return int(logits.shape[1])


def external_segmenter(spec: str, *, kwargs: dict[str, Any] | None = None, num_classes: int | None = None,
                       in_channels: int | None = None, image_size: tuple[int, int] | None = None,
                       class_names: Sequence[str] | None = None, normalize: str | None = None,
                       device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ExternalSegmenter]:
    """Load ``spec`` (see :func:`load_model`), fill in what the model itself tells (the input shape of a
    ``.pt2``, ``in_channels`` of MONAI-style modules, K by a forward pass) and wrap the normalisation.

    Returns (base model, description); ValueError naming the missing option when a size is unknown.
    """
    model, form, shape = load_model(spec, kwargs=kwargs, device=device)
    if shape is not None:
        in_channels = in_channels or shape[1]
        image_size = image_size or (shape[2], shape[3])
    in_channels = in_channels or _attribute(model, "in_channels")
    if in_channels is None:
        raise ValueError(f"--model {spec}: the number of input channels cannot be read from the model; "
                         f"give --in-channels (1 for grey images, 3 for RGB)")
    if image_size is None:
        raise ValueError(f"--model {spec}: the input size cannot be read from the model; give --image-size H,W "
                         f"(the size it was trained at; the image is resized to it)")
    found = probe_num_classes(model, in_channels, image_size, device)
    if num_classes is not None and num_classes != found:
        raise ValueError(f"--num-classes {num_classes}, but the model returns {found} channels of logits")
    names = tuple(class_names) if class_names else ("background", *(f"class_{k}" for k in range(1, found)))
    if len(names) != found:
        raise ValueError(f"--class-names names {len(names)} classes {names}, the model returns {found}")
    info = ExternalSegmenter(spec, found, int(in_channels), tuple(image_size), names, form=form)
    if normalize:
        info.normalize = parse_normalize(normalize, info.in_channels)
        model = Normalized(model, *info.normalize).to(device).eval()
    return model, info


def _attribute(model: torch.nn.Module, name: str) -> int | None:
    value = getattr(model, name, None)
    return int(value) if isinstance(value, int) and value > 0 else None
