"""Model files that would run code, read or write files, or mix the draws of a batch are refused
before they can do it.

Each hostile file of the security review (issue 34) is built here, shown to do harm when loaded
the way torch loads it (so the test has teeth), then handed to medcert, which must refuse it with
a message naming the file and the culprit and leave nothing behind.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medcert_core.__main__ import main
from medcert_core.models.external import check_batch_independence, external_segmenter, load_model
from medcert_core.models.program_check import allowed_target_name, check_graph

warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)

SIZE = 8


class Scratch(torch.nn.Module):
    """A 1x1 convolution plus a small uint8 scratch tensor that is filled in place: the graph the
    hostile edits start from (``ones`` becomes ``from_file``)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x):
        scratch = torch.ones(8, dtype=torch.uint8)
        scratch.fill_(65)
        return self.head(x) + scratch[:1].float() * 0


def save_program(module: torch.nn.Module, path: Path, batch: int = 1, dynamic: bool = False) -> Path:
    example = torch.rand(batch, 1, SIZE, SIZE)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic else None
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=shapes), path)
    return path


def rewrite(source: Path, target: Path, edit_graph=None, insert=None, replace=None, after=()) -> Path:
    """A copy of the .pt2 ``source``: its model.json passed through ``edit_graph``; ``insert`` (index,
    name, bytes): a member written before the original member at that index; ``replace`` {name:
    bytes}: new bytes for a member; ``after`` [(name, bytes)]: members added at the end (names
    relative to the archive's folder)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        folder = original.namelist()[0].split("/", 1)[0]
        for index, info in enumerate(original.infolist()):
            relative = info.filename.split("/", 1)[1]
            if insert and insert[0] == index:
                copy.writestr(f"{folder}/{insert[1]}", insert[2])
            content = (replace or {}).get(relative) or original.read(info.filename)
            if edit_graph and info.filename.endswith("models/model.json"):
                content = json.dumps(edit_graph(json.loads(content))).encode()
            copy.writestr(info, content)
        for name, content in after:
            copy.writestr(f"{folder}/{name}", content)
    return target


def from_file_writer(victim: Path):
    """A graph edit: the scratch tensor becomes ``torch.from_file(victim, shared=True)``, so its fill_
    writes 'AAAAAAAA' into the victim file."""
    def edit(graph):
        for node in graph["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.ones.default":
                node["target"] = "torch.ops.aten.from_file.default"
                node["inputs"] = [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                                  {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                                  {"name": "size", "arg": {"as_int": 8}, "kind": 1},
                                  {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}]
        return graph
    return edit


def victim_file(path: Path) -> Path:
    path.write_bytes(bytes(8))
    return path


def grey_png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 3 % 256).astype(np.uint8)).save(path)
    return path


def refused_by_certify(tmp_path: Path, model: Path, capsys) -> str:
    """Run ``certify`` on a grey image with ``--model model``: exit code 2, no traceback, nothing written."""
    output = tmp_path / "certified"
    capsys.readouterr()  # what came before (torch's own log of a teeth check)
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", str(grey_png(tmp_path / "x.png")), "--model", str(model), "--in-channels", "1",
              "--image-size", f"{SIZE},{SIZE}", "--sigma", "0.25", "--n", "50", "--output-dir", str(output)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert not output.exists() or not any(output.iterdir()), "a refused model writes nothing"
    return err


def test_a_torchscript_file_is_refused_without_running_it(tmp_path, capsys):
    class Writer(torch.nn.Module):
        def __init__(self, victim: str):
            super().__init__()
            self.victim = victim
            self.head = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x):
            written = torch.from_file(self.victim, shared=True, size=8, dtype=torch.uint8)
            written.fill_(65)
            return self.head(x) + written[:1].float() * 0  # used, so TorchScript keeps the write

    shown, kept = victim_file(tmp_path / "shown.bin"), victim_file(tmp_path / "kept.bin")
    torch.jit.save(torch.jit.script(Writer(str(shown))), tmp_path / "teeth.ts")
    torch.jit.load(str(tmp_path / "teeth.ts"))(torch.zeros(1, 1, SIZE, SIZE))
    assert shown.read_bytes() == b"A" * 8, "the fixture writes to a file when TorchScript runs it"

    torch.jit.save(torch.jit.script(Writer(str(kept))), tmp_path / "writer.ts")
    err = refused_by_certify(tmp_path, tmp_path / "writer.ts", capsys)
    assert "writer.ts is a TorchScript file: a TorchScript file is a program" in err
    assert "torch.export" in err and "--model package.module:function" in err
    assert kept.read_bytes() == bytes(8)


def test_a_pt2_whose_graph_writes_a_file_is_refused_before_its_graph_is_loaded(tmp_path, capsys):
    source = save_program(Scratch().eval(), tmp_path / "scratch.pt2")
    load_model(str(source))  # the unedited graph is accepted

    shown = victim_file(tmp_path / "shown.bin")
    teeth = torch.export.load(rewrite(source, tmp_path / "teeth.pt2", from_file_writer(shown)))
    teeth.module()(torch.zeros(1, 1, SIZE, SIZE))
    assert shown.read_bytes() == b"A" * 8, "the edited graph writes to a file when torch runs it"
    with pytest.raises(ValueError, match=r"teeth\.pt2: its graph calls call_function aten\.from_file\.default"):
        check_graph(teeth, tmp_path / "teeth.pt2")  # the check on the loaded graph, on its own

    kept = victim_file(tmp_path / "kept.bin")
    hostile = rewrite(source, tmp_path / "writer.pt2", from_file_writer(kept))
    err = refused_by_certify(tmp_path, hostile, capsys)
    assert "writer.pt2: its graph calls torch.ops.aten.from_file.default, which is not a pure tensor operator" in err
    assert kept.read_bytes() == bytes(8)


@pytest.mark.parametrize("target, allowed", [
    ("torch.ops.aten.conv2d.default", True), ("torch.ops.aten.upsample_bilinear2d.vec", True),
    ("_operator.getitem", True), ("torch.ops.aten.from_file.default", False), ("torch.save", False),
    ("torch.ops.aten.as_strided.default", False), ("torch.ops.aten.set_.source_Storage", False),
    ("#custom.op", False), ("builtins.eval", False), ("torch.ops.aten.conv2d", False)])
def test_only_pure_tensor_operators_are_allowed(target, allowed):
    assert allowed_target_name(target) is allowed


def test_a_pt2_with_a_duplicated_member_is_refused_before_it_unpickles(tmp_path):
    source = save_program(Scratch().eval(), tmp_path / "scratch.pt2")

    def hostile(marker: Path, path: Path) -> Path:
        """The weights' config twice: one copy, read by torch, marks the first weight as a pickle that
        opens ``marker`` when unpickled; the last copy, read by Python's zipfile, is the original. (torch's
        reader binary-searches sorted names, so which copy it reads depends on where the first one lies.)"""
        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        with zipfile.ZipFile(source) as original:
            names = [name.split("/", 1)[1] for name in original.namelist()]
        config_name = next(name for name in names if name.endswith("model_weights_config.json"))
        with zipfile.ZipFile(source) as original:
            config = json.loads(original.read(f"scratch/{config_name}"))
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        payload = io.BytesIO()
        torch.save(Payload(), payload)
        weight = f"{config_name.rsplit('/', 1)[0]}/{entry['path_name']}"
        for index in range(names.index(config_name) + 1):
            rewrite(source, path, insert=(index, config_name, json.dumps(config)), replace={weight: payload.getvalue()})
            read = json.loads(torch._C.PyTorchFileReader(str(path)).get_record(config_name))
            if next(iter(read["config"].values()))["use_pickle"]:
                return path
        raise AssertionError("no place of the second copy makes torch read it")

    shown = tmp_path / "shown"
    with pytest.raises(Exception):
        torch.export.load(hostile(shown, tmp_path / "teeth.pt2"))
    assert shown.exists(), "torch reads the first copy and runs the pickle"

    kept = tmp_path / "kept"
    with pytest.raises(ValueError, match=r"duplicated\.pt2: the member .* appears more than once"):
        load_model(str(hostile(kept, tmp_path / "duplicated.pt2")))
    assert not kept.exists()


def shared_library(marker: Path, tmp_path: Path) -> bytes:
    """A shared library whose constructor writes ``marker`` when it is loaded."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the native payload")
    source = tmp_path / "payload.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) {\n'
                      f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    library = tmp_path / f"payload_{marker.name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library.read_bytes()


def test_a_pt2_carrying_native_code_is_refused_before_it_is_loaded(tmp_path, capsys):
    source = save_program(Scratch().eval(), tmp_path / "scratch.pt2")

    def hostile(marker: Path, path: Path) -> Path:
        aoti = "data/aotinductor/model"
        return rewrite(source, path, after=[(f"{aoti}/wrapper_metadata.json", "{}"),
                                            (f"{aoti}/model_metadata.json", '{"AOTI_DEVICE_KEY": "cpu"}'),
                                            (f"{aoti}/model.so", shared_library(marker, tmp_path))])

    shown = tmp_path / "shown"
    with pytest.raises(Exception):
        torch.export.load(hostile(shown, tmp_path / "teeth.pt2"))
    assert shown.exists(), "torch extracts and loads the library"

    kept = tmp_path / "kept"
    err = refused_by_certify(tmp_path, hostile(kept, tmp_path / "native.pt2"), capsys)
    assert "native.pt2: its member data/aotinductor/model/" in err and "native code" in err
    assert not kept.exists()


def test_a_pt2_member_that_torch_export_save_does_not_write_is_refused(tmp_path):
    source = save_program(Scratch().eval(), tmp_path / "scratch.pt2")
    with pytest.raises(ValueError, match=r"extra_member\.pt2: its member data/run\.py is not one torch\.export\.save"):
        load_model(str(rewrite(source, tmp_path / "extra_member.pt2", after=[("data/run.py", "print(1)")])))
    with pytest.raises(ValueError, match=r"dotdot\.pt2: the member name 'scratch/data/\.\./x' is not a normalised"):
        load_model(str(rewrite(source, tmp_path / "dotdot.pt2", after=[("data/../x", "1")])))


@pytest.mark.parametrize("through_a_view", [False, True])
def test_a_pt2_that_writes_its_input_is_refused(tmp_path, through_a_view):
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x):
            (x[:, :, :2] if through_a_view else x).mul_(2)
            return self.head(x)

    with pytest.raises(ValueError, match=r"in_place\.pt2: its graph's aten\.mul_\.Tensor writes to x \(an input, a "
                                         r"parameter or a constant\)"):
        load_model(str(save_program(InPlace().eval(), tmp_path / "in_place.pt2")))


class BatchNormed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                        torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("batch, dynamic", [(2, True), (2, False)])
def test_a_program_traced_with_batchnorm_in_training_mode_is_refused(tmp_path, batch, dynamic):
    torch.manual_seed(0)
    train_mode = save_program(BatchNormed().train(), tmp_path / "train_mode.pt2", batch, dynamic)
    with pytest.raises(ValueError, match=r"train_mode\.pt2: the model's output for an image depends on the other "
                                         r"images of its batch \(largest difference \d"):
        external_segmenter(str(train_mode), image_size=(SIZE, SIZE))
    torch.manual_seed(0)
    eval_mode = save_program(BatchNormed().eval(), tmp_path / "eval_mode.pt2", batch, dynamic)
    _, info = external_segmenter(str(eval_mode))
    assert info.num_classes == 2 and info.image_size == (SIZE, SIZE)


class BatchMixer(torch.nn.Module):
    """Subtracts the batch mean: each image's logits depend on its batch-mates."""

    in_channels = 1

    def __init__(self, mix: bool = True):
        super().__init__()
        self.mix = mix
        self.head = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.head(x - x.mean(0, keepdim=True) if self.mix else x)


def test_an_entry_point_that_mixes_batch_items_is_refused(tmp_path, monkeypatch):
    import sys
    import types

    users = types.ModuleType("user_models")
    users.BatchMixer = BatchMixer
    monkeypatch.setitem(sys.modules, "user_models", users)
    with pytest.raises(ValueError, match=r"--model user_models:BatchMixer: the model's output for an image depends"):
        external_segmenter("user_models:BatchMixer", image_size=(SIZE, SIZE))
    assert check_batch_independence(BatchMixer(mix=False).eval(), 1, (SIZE, SIZE), "plain") < 1e-5
