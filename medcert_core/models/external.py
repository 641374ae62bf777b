"""Segmenters medcert did not train: a ``torch.export`` program (``.pt2``) or a Python entry point
``package.module:function`` returning an ``nn.Module``.

The base model f of the certificate is the module as loaded, with an optional per-channel
normalisation ``(x - mean) / std`` in front of it (:class:`Normalized`): the noise is added to the
[0, 1] image, then normalised, as DESIGN.md requires, so the radius is measured in the [0, 1] scale.

What each form may do:

- ``torch.export`` (``.pt2``): a file is data, so it is accepted only when what it can do is known
  (:mod:`medcert_core.models.program_check`): its members are the kinds ``torch.export.save``
  writes, read with torch's own reader, with no native code and no pickle beyond plain tensors; its
  graph calls only pure tensor operators and writes to nothing but its own buffers. Both are checked
  before ``torch.export.load`` runs (on the serialized graph) and after it (on the loaded graph),
  before any call. Its input shape is read from the program.
- ``package.module:function``: imports and calls your own code, with ``kwargs`` as keyword arguments.
  This is the one way user code runs: give only an entry point you trust, as with any Python import.

Refused: a TorchScript file (a program for TorchScript's interpreter, whose operators include
reading and writing files; export a ``.pt2`` instead, or load it in your own entry point) and a file
saved with ``torch.save(model)`` (a pickled module, which only a full pickle can load).

Every model, whatever its form, must treat the images of a batch independently
(:func:`check_batch_independence`): a model whose output for one image depends on its batch-mates
(BatchNorm in training mode baked into a graph) would break the independence of the draws that the
certificate's binomial test needs.
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

from medcert_core.models.program_check import check_archive, check_graph, check_serialized_graph

ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
MODEL_FORMS = "a torch.export program (.pt2, torch.export.save) or package.module:function"
BATCH_TOLERANCE = 1e-3  # largest |model(batch)[i] - model(batch[i:i+1])|, relative to the logits' scale


@dataclass
class ExternalSegmenter:
    """What ``certify`` needs to know about a segmenter it did not train (the fields of a TrainConfig it reads)."""

    source: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, ...]  # (H, W), or (D, H, W) for a volume's model
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
        members = _zip_members(path)
        if any(name.endswith("/archive_format") for name in members):
            module, shape = _load_export_program(path, device)
            return module, "torch.export", shape
        _refuse_model_file(path, members)
    if ENTRY_POINT.fullmatch(spec):
        return _call_entry_point(spec, kwargs or {}).to(device).eval(), "entry point", None
    raise FileNotFoundError(f"--model {spec!r}: no such file, and not an entry point package.module:function; "
                            f"expected {MODEL_FORMS}")


def _zip_members(path: Path) -> list[str]:
    """The member names of a zip file ([] for any other file)."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return []


def _refuse_model_file(path: Path, members: list[str]) -> None:
    """The ValueError for a model file that is not a torch.export program, saying what it is and what to do."""
    if any("/code/" in f"/{name}" for name in members):
        raise ValueError(f"{path} is a TorchScript file: a TorchScript file is a program (its operators can read and "
                         f"write any file), so medcert does not run it. Export the network with torch.export "
                         f"(torch.export.save(torch.export.export(model.eval(), (example,)), 'model.pt2')), or load "
                         f"it in your own code and give --model package.module:function (the one way user code runs)")
    if any(name.endswith("data.pkl") for name in members):
        raise ValueError(f"{path} is a torch.save file (a pickle), not a torch.export model: a pickled module can "
                         f"only be loaded by running code from the file, which medcert refuses. A medcert "
                         f"checkpoint goes to --checkpoint; otherwise export the model (torch.export.save) or give "
                         f"--model package.module:function")
    if any(name.endswith("serialized_exported_program.json") for name in members):
        raise ValueError(f"{path} is a torch.export file of torch 2.7 or older, which torch loads with a full "
                         f"pickle; re-save it with torch.export.save of the installed torch ({torch.__version__})")
    raise ValueError(f"cannot load {path} as a model: expected {MODEL_FORMS}")


def _load_export_program(path: Path, device: str | torch.device) -> tuple[torch.nn.Module, tuple[int, ...] | None]:
    """Check the archive and its serialized graph, ``torch.export.load`` the same bytes, check the loaded graph."""
    content = path.read_bytes()  # one read: the bytes checked are the bytes loaded
    try:
        members = check_archive(content, path)
    except RuntimeError as error:  # torch's reader refuses the zip
        raise ValueError(f"cannot read {path} as a torch.export archive ({error})") from error
    check_serialized_graph(members, path)
    try:
        program = torch.export.load(io.BytesIO(content))
    except Exception as error:
        raise ValueError(f"cannot load {path} as a torch.export program ({error})") from error
    check_graph(program, path)
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
    """K read from one forward pass on a zero image (1, C, H, W) (a fixed-batch program's batch of them);
    ValueError with the model's error."""
    batch = _fixed_batch(model)
    try:
        with torch.inference_mode():
            logits = model(torch.zeros(batch, in_channels, *image_size, device=device))
    except Exception as error:
        raise ValueError(f"the model fails on an input of shape ({batch}, {in_channels}, {image_size[0]}, "
                         f"{image_size[1]}) ({error}); check --in-channels and --image-size") from error
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model returns {shape} for a ({batch}, {in_channels}, {image_size[0]}, "
                         f"{image_size[1]}) input; a segmenter must return logits (B, K, H, W)")
    return int(logits.shape[1])


def _fixed_batch(model: torch.nn.Module) -> int:
    """The batch size a model must be called with: a fixed-batch torch.export program's, else 1 (any)."""
    return next((module.batch for module in model.modules() if isinstance(module, ExportedModule) and module.batch), 1)


def check_batch_independence(model: torch.nn.Module, in_channels: int, image_size: tuple[int, ...], source: str,
                             device: str | torch.device = "cpu", batch: int = 4) -> float:
    """Refuse a model whose output for one image depends on the other images of its batch.

    On random images in [0, 1], ``model(batch)[i]`` must equal ``model(batch[i:i+1])`` within
    :data:`BATCH_TOLERANCE` of the logits' scale (for a program exported with a fixed batch b > 1:
    item i with other batch-mates). Returns the largest difference; ValueError naming ``source`` and it.
    """
    unit = _fixed_batch(model)
    size = unit if unit > 1 else batch
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(size, in_channels, *image_size, generator=generator).to(device)
    with torch.inference_mode():
        together = model(images).float()
        if unit == 1:
            apart = torch.cat([model(images[i:i + 1]).float() for i in range(size)])
        else:  # item i kept, its batch-mates replaced
            apart = together.clone()
            for i in range(min(size, 2)):
                mates = torch.rand(size, in_channels, *image_size, generator=generator).to(device)
                mates[i] = images[i]
                apart[i] = model(mates)[i].float()
    difference = float((together - apart).abs().max())
    scale = max(1.0, float(together.abs().max()))
    if not difference <= BATCH_TOLERANCE * scale:
        raise ValueError(f"{source}: the model's output for an image depends on the other images of its batch "
                         f"(largest difference {difference:.3g} between model(batch)[i] and model(batch[i:i+1]) on "
                         f"random images in [0, 1], logits up to {scale:.3g}), e.g. BatchNorm in training mode baked "
                         f"into an exported graph (export after model.eval()) or layers that mix batch items; the "
                         f"certificate's binomial test needs every draw segmented on its own; medcert refuses it")
    return difference


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
    return checked_external(model, spec, form, found, int(in_channels), tuple(image_size), num_classes=num_classes,
                            class_names=class_names, normalize=normalize, device=device)


def checked_external(model: torch.nn.Module, spec: str, form: str, found: int, in_channels: int,
                     image_size: tuple[int, ...], *, num_classes: int | None, class_names: Sequence[str] | None,
                     normalize: str | None, device: str | torch.device) -> tuple[torch.nn.Module, ExternalSegmenter]:
    """What an external model of ``found`` classes at ``image_size`` (2D or 3D) must satisfy once K is known:
    the options agree with it (``--num-classes``, ``--class-names``), its draws are independent of their
    batch-mates; returns it with ``--normalize`` inside, and its description."""
    if num_classes is not None and num_classes != found:
        raise ValueError(f"--num-classes {num_classes}, but the model returns {found} channels of logits")
    names = tuple(class_names) if class_names else ("background", *(f"class_{k}" for k in range(1, found)))
    if len(names) != found:
        raise ValueError(f"--class-names names {len(names)} classes {names}, the model returns {found}")
    check_batch_independence(model, in_channels, image_size, f"--model {spec}", device)
    info = ExternalSegmenter(spec, found, in_channels, image_size, names, form=form)
    if normalize:
        info.normalize = parse_normalize(normalize, in_channels)
        model = Normalized(model, *info.normalize).to(device).eval()  # broadcasts over every spatial axis
    return model, info


def _attribute(model: torch.nn.Module, name: str) -> int | None:
    value = getattr(model, name, None)
    return int(value) if isinstance(value, int) and value > 0 else None
