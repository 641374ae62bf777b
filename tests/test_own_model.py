"""Your model, your images: certify exported and third-party segmenters on DICOM, NIfTI and 16-bit files.

Every mapping from file values to [0, 1] is checked against the formula written out here (DICOM's
rescale, bit range, linear window and MONOCHROME1 inversion; NIfTI slices; 16-bit PNG at full depth);
every model form is checked to give the certificate of the same network certified directly.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from medcert_core.__main__ import main
from medcert_core.data.medical import parse_intensity, parse_slice, read_with_mapping
from medcert_core.single_image import LEGEND_WIDTH, certify_image_file, read_image_file
from medcert_core.smoothing import SmoothedSegmenter
from medcert_core.testing.medical_files import write_dicom, write_nifti

warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)

SIZE = 16
CERTIFY = dict(denoiser="none", sigma=0.5, n0=5, n=60, alpha=0.01, seed=11, progress=False)


# --------------------------------------------------------------------------- files made here


def ramp(height=24, width=20, top=4095):
    return (np.arange(height * width).reshape(height, width) * 37) % (top + 1)


# --------------------------------------------------------------------------- DICOM


def test_dicom_auto_maps_the_stored_bit_range_after_the_rescale_and_inverts_monochrome1(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "cr.dcm", stored, photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100)
    image, mapping = read_with_mapping(path)
    low, high = 0 * 2 - 100, 4095 * 2 - 100  # BitsStored 12, unsigned, then slope / intercept
    expected = 1 - (stored * 2 - 100 - low) / (high - low)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert mapping["inverted"] and mapping["bits_stored"] == 12 and mapping["rescale"] == {"slope": 2.0, "intercept": -100.0}

    grey = write_dicom(tmp_path / "dx.dcm", stored)  # MONOCHROME2: not inverted
    np.testing.assert_allclose(read_with_mapping(grey)[0], stored / 4095, atol=1e-6)


def test_dicom_windows_follow_the_standard_linear_formula(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "ct.dcm", stored, bits=16, signed=True, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=40, WindowWidth=400)
    hu = stored.astype(float) - 1024

    def window(values, center, width):  # PS3.3 C.11.2.1.2, written out case by case
        out = np.empty_like(values)
        for index, value in np.ndenumerate(values):
            if value <= center - 0.5 - (width - 1) / 2:
                out[index] = 0
            elif value > center - 0.5 + (width - 1) / 2:
                out[index] = 1
            else:
                out[index] = ((value - (center - 0.5)) / (width - 1) + 0.5)
        return out

    voi, mapping = read_with_mapping(path, parse_intensity("voi"))
    np.testing.assert_allclose(voi, window(hu, 40, 400), atol=1e-6)
    assert mapping["window_center"] == 40 and mapping["window_width"] == 400
    given, mapping = read_with_mapping(path, parse_intensity("window:-600,1500"))
    np.testing.assert_allclose(given, window(hu, -600, 1500), atol=1e-6)
    assert mapping["intensity"] == "window:-600,1500"
    minmax, _ = read_with_mapping(path, parse_intensity("minmax"))
    np.testing.assert_allclose(minmax, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    # the default maps the full signed 16-bit range, not the window
    auto, _ = read_with_mapping(path)
    np.testing.assert_allclose(auto, (hu - (-32768 - 1024)) / 65535, atol=1e-6)


def test_dicom_bad_input_names_the_file_and_the_way_out(tmp_path):
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(b"DICM" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.dcm.*not a DICOM file or corrupt"):
        read_with_mapping(corrupt)
    no_decoder = write_dicom(tmp_path / "jpegls.dcm", ramp(), syntax=JPEGLSLossless)  # no JPEG-LS codec installed
    with pytest.raises(ValueError, match=r"jpegls\.dcm.*JPEG-LS.*no decoder.*pylibjpeg.*gdcmconv"):
        read_with_mapping(no_decoder)
    broken = write_dicom(tmp_path / "j2k.dcm", ramp(), syntax=JPEG2000Lossless)  # Pillow decodes J2K: bad bytes
    with pytest.raises(ValueError, match=r"j2k\.dcm.*JPEG 2000.*does not decode \(truncated or corrupt\)"):
        read_with_mapping(broken)
    frames = write_dicom(tmp_path / "cine.dcm", np.stack([ramp(), ramp() // 2]))
    with pytest.raises(ValueError, match=r"cine\.dcm.*2 frames.*--slice 0:FRAME"):
        read_with_mapping(frames)
    np.testing.assert_allclose(read_with_mapping(frames, slice_spec=parse_slice("0:1"))[0], (ramp() // 2) / 4095,
                               atol=1e-6)
    plain = write_dicom(tmp_path / "nowindow.dcm", ramp())
    with pytest.raises(ValueError, match=r"nowindow\.dcm.*no WindowCenter.*window:CENTER,WIDTH"):
        read_with_mapping(plain, parse_intensity("voi"))
    for bad in ("window:40", "window:40,1", "lung", "window:a,b"):
        with pytest.raises(ValueError, match="auto, minmax, voi, window:CENTER,WIDTH"):
            parse_intensity(bad)


def test_an_rgb_dicom_is_refused_by_a_one_channel_model(tmp_path):
    colour = np.stack([ramp(top=255), 255 - ramp(top=255), ramp(top=255) // 2], axis=-1)
    path = write_dicom(tmp_path / "photo.dcm", colour, photometric="RGB", bits=8)
    image, _ = read_with_mapping(path)
    np.testing.assert_allclose(image, colour / 255, atol=1e-6)
    with pytest.raises(ValueError, match=r"photo\.dcm is a colour image and the model takes 1 channel"):
        certify_image_file(path, None, model=exported(tmp_path, "torch.export", channels=1), **CERTIFY)


# --------------------------------------------------------------------------- NIfTI and 16-bit files


def test_nifti_reads_a_2d_image_and_one_slice_of_a_volume_as_stored(tmp_path):
    volume = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)
    path = write_nifti(tmp_path / "ct.nii.gz", volume)
    with pytest.raises(ValueError, match=r"ct\.nii\.gz is a volume of shape \(6, 7, 5\).*--slice AXIS:INDEX"):
        read_with_mapping(path)
    plane = volume[:, :, 3].astype(float)
    image, mapping = read_with_mapping(path, slice_spec=parse_slice("2:3"))
    np.testing.assert_allclose(image, (plane + 32768) / 65535, atol=1e-6)  # int16: its dtype's range
    assert mapping["slice"] == {"axis": 2, "index": 3} and "rows = array axis 0, columns = axis 1" in mapping["axes"]
    with pytest.raises(ValueError, match=r"slice 2:9 is outside the volume of shape \(6, 7, 5\)"):
        read_with_mapping(path, slice_spec=parse_slice("2:9"))
    flat = write_nifti(tmp_path / "xray.nii", np.linspace(0, 1, 48, dtype=np.float32).reshape(8, 6, 1))
    image, mapping = read_with_mapping(flat)
    np.testing.assert_allclose(image, np.linspace(0, 1, 48).reshape(8, 6), atol=1e-6)
    assert mapping["intensity"].startswith("auto (as stored")
    scaled = write_nifti(tmp_path / "hu.nii", (volume[:, :, 0] * 10).astype(np.int16), slope=0.5, inter=-10)
    image, mapping = read_with_mapping(scaled, parse_intensity("window:0,50"))
    values = volume[:, :, 0] * 10 * 0.5 - 10.0
    np.testing.assert_allclose(image, np.clip((values + 0.5) / 49 + 0.5, 0, 1), atol=1e-6)
    assert mapping["rescale"] == {"slope": 0.5, "intercept": -10.0}


def test_16_bit_png_and_tiff_keep_their_full_depth(tmp_path):
    import png
    import tifffile
    from PIL import Image

    grey = ((np.arange(32 * 32).reshape(32, 32) * 61) % 65536).astype(np.uint16)
    colour = np.stack([grey, 65535 - grey, (grey.astype(np.int64) * 3) % 65536], axis=-1).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    png.from_array(colour.reshape(32, -1), "RGB;16").save(tmp_path / "colour16.png")  # PIL would read 8 bits
    tifffile.imwrite(tmp_path / "colour16.tif", colour)
    np.testing.assert_allclose(read_with_mapping(tmp_path / "grey16.png")[0], grey / 65535, atol=1e-7)
    for name in ("colour16.png", "colour16.tif"):
        image, mapping = read_with_mapping(tmp_path / name)
        np.testing.assert_allclose(image, colour / 65535, atol=1e-7)
        assert mapping["stored_dtype"] == "uint16" and mapping["bits_stored"] == 16
    assert len(np.unique(read_image_file(tmp_path / "colour16.png")[0].numpy())) > 256, "more levels than 8 bits hold"


# --------------------------------------------------------------------------- models


def medcert_checkpoint(path, channels=1):
    """A tiny untrained 2-class ResUNet++ as ``medcert train`` writes it, its bias set so that the classes
    tie under the noise (the counts, hence the p-values, depend on every draw)."""
    from medcert_core.training import TrainConfig

    config = TrainConfig(arch="resunetpp", in_channels=channels, num_classes=2, class_names=("background", "lung"),
                         image_size=(SIZE, SIZE), model_kwargs={"base_channels": 4}, dataset="phantom")
    torch.manual_seed(0)
    model = config.build_model().eval()
    with torch.no_grad():
        noisy = 0.5 + 0.5 * torch.randn(32, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        means = model(noisy).mean((0, 2, 3))
        model.head.bias[1] -= means[1] - means[0]
    torch.save({"config": dataclasses.asdict(config), "state_dict": model.state_dict()}, path)
    return path, model


def exported(tmp_path, form, channels=1, dynamic_batch=False):
    """The checkpoint's network as a torch.export program (batch of 1, or dynamic); ``form`` is "torch.export"
    (TorchScript files are refused: tests/test_hostile_models.py)."""
    assert form == "torch.export"
    _, model = medcert_checkpoint(tmp_path / f"source_{channels}.pt", channels)
    example = torch.zeros(1, channels, SIZE, SIZE)
    path = tmp_path / f"model_{channels}{'_dynamic' if dynamic_batch else ''}.pt2"
    if dynamic_batch:
        batch = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
        program = torch.export.export(model, (example.expand(2, -1, -1, -1),), dynamic_shapes=batch)
    else:
        program = torch.export.export(model, (example,))
    torch.export.save(program, path)
    return str(path)


def grey_image(path):
    from PIL import Image

    yy, xx = np.mgrid[:24, :24]
    Image.fromarray(((xx * 7 + yy * 3) % 256).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def recorded_pvalues(monkeypatch):
    """The p-values of every certificate made while the test runs, in order."""
    pvalues = []
    original = SmoothedSegmenter.certify

    def recording(self, *args, **kwargs):
        certificate = original(self, *args, **kwargs)
        pvalues.append(certificate.pvalues.cpu().numpy())
        return certificate

    monkeypatch.setattr(SmoothedSegmenter, "certify", recording)
    return pvalues


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_an_exported_medcert_model_gives_the_certificate_of_its_checkpoint(tmp_path, dynamic_batch, recorded_pvalues):
    image = grey_image(tmp_path / "x.png")
    checkpoint, _ = medcert_checkpoint(tmp_path / "medcert.pt")
    direct = certify_image_file(image, checkpoint, output_dir=tmp_path / "direct", **CERTIFY)
    # a .pt2 tells its input shape
    summary = certify_image_file(image, None, model=exported(tmp_path, "torch.export", dynamic_batch=dynamic_batch),
                                 output_dir=tmp_path / "exported", **CERTIFY)
    assert summary["model_form"] == "torch.export" and summary["num_classes"] == 2 and summary["image_size"] == [SIZE, SIZE]
    np.testing.assert_array_equal(recorded_pvalues[0], recorded_pvalues[1])
    assert 0.05 < (recorded_pvalues[0] < 0.5).mean() < 0.95, "p-values that depend on the noise"
    assert summary["certified_pixels"] == {"background": direct["certified_pixels"]["background"],
                                           "class_1": direct["certified_pixels"]["lung"]}
    assert summary["noise_seed"] == direct["noise_seed"]


def user_smp_module(tmp_path, monkeypatch):
    """A user's own module on the path, building an smp UNet (encoder weights None: nothing downloads)."""
    (tmp_path / "my_models.py").write_text(
        "import segmentation_models_pytorch as smp\n"
        "def build(classes=2, channels=1):\n"
        "    return smp.Unet('resnet18', encoder_weights=None, in_channels=channels, classes=classes,\n"
        "                    encoder_depth=3, decoder_channels=(16, 8, 4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("library", ["monai", "smp"])
def test_a_third_party_model_certifies_as_the_same_network_certified_directly(tmp_path, library, monkeypatch,
                                                                             recorded_pvalues):
    image = grey_image(tmp_path / "x.png")
    if library == "monai":
        spec, kwargs = "monai.networks.nets:UNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                                    "channels": [4, 8], "strides": [2]}
        sizes = {"image_size": (SIZE, SIZE)}  # in_channels is read from the module
    else:
        user_smp_module(tmp_path, monkeypatch)
        spec, kwargs, sizes = "my_models:build", {"classes": 3}, {"image_size": (SIZE, SIZE), "in_channels": 1}
    torch.manual_seed(5)
    summary = certify_image_file(image, None, model=spec, model_kwargs=kwargs, output_dir=tmp_path / "out",
                                 **sizes, **CERTIFY)
    assert summary["num_classes"] == 3 and summary["in_channels"] == 1 and summary["model_form"] == "entry point"

    from medcert_core.models.external import load_model
    from medcert_core.single_image import model_input

    torch.manual_seed(5)  # the same initial weights
    network, _, _ = load_model(spec, kwargs=kwargs)
    tensor = model_input(read_image_file(image)[0], 1, (SIZE, SIZE))
    generator = torch.Generator().manual_seed(summary["noise_seed"])
    SmoothedSegmenter(network, 3, 0.5).certify(tensor, 5, 60, alpha=0.01, generator=generator)
    np.testing.assert_array_equal(recorded_pvalues[0], recorded_pvalues[1])


def test_normalize_runs_inside_the_base_model_after_the_noise(tmp_path, recorded_pvalues):
    image = grey_image(tmp_path / "x.png")
    model = exported(tmp_path, "torch.export", dynamic_batch=True)
    certify_image_file(image, None, model=model, normalize="0.4,0.2", output_dir=tmp_path / "a", **CERTIFY)

    class Normalizing(torch.nn.Module):  # written out: noise first, then (x - mean) / std, then the network
        def __init__(self):
            super().__init__()
            object.__setattr__(self, "network", torch.export.load(model).module())  # not a child: no eval()

        def forward(self, x):
            return self.network((x - 0.4) / 0.2)

    from medcert_core.single_image import model_input

    tensor = model_input(read_image_file(image)[0], 1, (SIZE, SIZE))
    summary = json.loads((tmp_path / "a" / "x_certificate.json").read_text())
    SmoothedSegmenter(Normalizing(), 2, 0.5).certify(tensor, 5, 60, alpha=0.01,
                                                     generator=torch.Generator().manual_seed(summary["noise_seed"]))
    np.testing.assert_array_equal(recorded_pvalues[0], recorded_pvalues[1])
    assert summary["normalize"] == {"mean": [0.4], "std": [0.2]}
    assert summary["radius"] == pytest.approx(0.5 * 0.6744897501960817), "the radius stays in the [0, 1] scale"


def test_model_files_that_would_run_code_are_refused(tmp_path):
    from medcert_core.models.external import load_model

    _, network = medcert_checkpoint(tmp_path / "source.pt")
    torch.save(network, tmp_path / "pickled_module.pt")
    with pytest.raises(ValueError, match=r"pickled_module\.pt is a torch\.save file \(a pickle\), not a torch\.export "
                                         r"model.*refuses"):
        load_model(str(tmp_path / "pickled_module.pt"))

    # a .pt2 whose weight is marked as a pickle holding an object that would write a file when loaded
    import zipfile

    program = exported(tmp_path, "torch.export")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(program) as source:
        config_name = next(name for name in source.namelist() if name.endswith("model_weights_config.json"))
        config = json.loads(source.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    weight = f"{config_name.rsplit('/', 1)[0]}/{first['path_name']}"
    import io

    payload = io.BytesIO()
    torch.save(Payload(), payload)
    replaced = {config_name: json.dumps(config).encode(), weight: payload.getvalue()}
    with zipfile.ZipFile(program) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            target.writestr(item, replaced.get(item.filename) or source.read(item.filename))
    with pytest.raises(ValueError, match=r"tampered\.pt2: its part .*weight.* does not load as plain tensors"):
        load_model(str(tampered))
    assert not marker.exists(), "nothing from the file ran"


def test_model_options_are_checked_before_any_draw(tmp_path, monkeypatch):
    image = grey_image(tmp_path / "x.png")
    checkpoint, _ = medcert_checkpoint(tmp_path / "medcert.pt")
    # an entry point whose input channels and size cannot be read from the module
    (tmp_path / "plain_models.py").write_text("import torch\n"
                                              "def build():\n"
                                              "    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = "plain_models:build"
    cases = [
        (dict(checkpoint=None), "either --checkpoint .* or --model"),
        (dict(checkpoint=checkpoint, model=model), "either --checkpoint .* or --model"),
        (dict(checkpoint=None, model=model, image_size=(SIZE, SIZE)), "give --in-channels"),
        (dict(checkpoint=None, model=model, in_channels=1), "give --image-size"),
        (dict(checkpoint=None, model=model, in_channels=1, image_size=(SIZE, SIZE), num_classes=3),
         "--num-classes 3, but the model returns 2"),
        (dict(checkpoint=None, model=model, in_channels=3, image_size=(SIZE, SIZE)), "fails on an input of shape"),
        (dict(checkpoint=None, model=model, in_channels=1, image_size=(SIZE, SIZE), normalize="0.5,0"), "std > 0"),
        (dict(checkpoint=None, model="no_such_module:build"), "cannot import build from no_such_module"),
        (dict(checkpoint=None, model="nowhere.pt"), "no such file, and not an entry point"),
        (dict(checkpoint=None, model=str(checkpoint)), r"medcert\.pt is a torch\.save file \(a pickle\)"),
        (dict(checkpoint=checkpoint, in_channels=1), "--in-channels apply to --model"),
    ]
    for options, message in cases:
        checkpoint_option = options.pop("checkpoint")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            certify_image_file(image, checkpoint_option, **options, **CERTIFY | {"n": 10**9})


# --------------------------------------------------------------------------- the command line and the legend


def test_certify_a_dicom_with_an_exported_model_from_the_command_line(tmp_path, capsys):
    from PIL import Image

    model = exported(tmp_path, "torch.export", dynamic_batch=True)
    stored = ramp(40, 32)
    path = write_dicom(tmp_path / "patient.dcm", stored, photometric="MONOCHROME1", WindowCenter=2000,
                       WindowWidth=3000)
    main(["certify", str(path), "--model", model, "--class-names", "background,lung", "--intensity", "voi",
          "--sigma", "0.25", "--n", "60", "--alpha", "0.01", "--seed", "3", "--output-dir", str(tmp_path / "out")])
    summary = json.loads(capsys.readouterr().out)
    mapping = summary["file_to_tensor"]
    assert mapping["format"] == "dicom" and mapping["inverted"] and mapping["intensity"] == "voi"
    assert mapping["resize"].startswith("40 x 32 -> 16 x 16") and mapping["tensor"] == "[0, 1]^(1x16x16)"
    assert mapping["channels"] == "as stored"
    assert set(summary["certified_pixels"]) == {"background", "lung"}

    legend = np.array(Image.open(summary["legend_png"]))
    assert legend.shape[1] == 32 + LEGEND_WIDTH and legend.shape[0] >= 40
    np.testing.assert_array_equal(legend[:40, :32], np.array(Image.open(summary["overlay_native_png"])))
    panel = legend[:, 32:].reshape(-1, 3)
    lung_colour = np.array([230, 75, 53])
    assert (panel == lung_colour).all(axis=1).sum() >= 100, "the lung's swatch is drawn"
    assert (panel == 255).all(axis=1).sum() >= 100, "the abstain swatch is drawn"

    from medcert_core.single_image import legend_lines

    text = [line for _, line in legend_lines(summary, ("background", "lung"))]
    assert f"radius R = {summary['radius']:.3f} (L2, [0, 1] scale)" in text
    assert any(line.startswith("lung (") for line in text) and any(line.startswith("abstain:") for line in text)

    with pytest.raises(SystemExit):
        main(["certify", str(path), "--model", model, "--intensity", "window:1", "--sigma", "0.25"])
    assert "auto, minmax, voi, window:CENTER,WIDTH" in capsys.readouterr().err


def test_the_folder_dataset_reads_dicom_images_and_nifti_masks(tmp_path):
    from medcert_core.data import load_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for index in range(4):
        stored = (ramp(24, 20) + 300 * index) % 4096
        write_dicom(tmp_path / "images" / f"case{index}.dcm", stored, photometric="MONOCHROME1")
        write_nifti(tmp_path / "masks" / f"case{index}.nii.gz", (stored > 2000).astype(np.uint8))
    dataset = load_dataset("folder", tmp_path, "all", image_size=(24, 20))
    assert len(dataset) == 4
    image, mask = dataset[1]
    stored = (ramp(24, 20) + 300) % 4096
    np.testing.assert_allclose(image[0].numpy(), 1 - stored / 4095, atol=1e-6)
    assert image.shape == (3, 24, 20), "grey replicated to the folder's default 3 channels"
    np.testing.assert_array_equal(mask.numpy(), (stored > 2000).astype(np.int64))


@pytest.mark.parametrize(("native", "size", "stored", "channels"),
                         [((48, 40), (16, 16), 1, 3), ((512, 512), (128, 128), 1, 1), ((30, 36), (45, 54), 3, 1)])
def test_the_radius_on_the_file_bounds_how_far_the_file_image_moves_the_tensor(native, size, stored, channels):
    from medcert_core.single_image import channel_norm, model_input, radius_on_the_file, resize_norm_bound

    factor = channel_norm(stored, channels) * resize_norm_bound(native, size)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(stored, *native, generator=generator, dtype=torch.float64) * 0.5 + 0.25  # no clipping here

    def tensor(x):
        return model_input(x, channels, size)

    # the direction that moves the tensor most (power iteration on the whole linear map), and random ones
    direction = torch.randn(stored, *native, generator=generator, dtype=torch.float64)
    for _ in range(200):
        direction.requires_grad_(True)
        moved = tensor(direction)
        (pulled,) = torch.autograd.grad(moved, direction, grad_outputs=moved)
        direction = (pulled / pulled.norm()).detach()
    largest = float(tensor(direction).norm())
    assert largest <= factor * (1 + 1e-9), "the bound holds in the worst direction"
    assert largest >= 0.85 * factor, "and is not loose by more than 15 %"
    for _ in range(20):
        delta = torch.randn(stored, *native, generator=generator, dtype=torch.float64) * 0.01
        assert float((tensor(image + delta) - tensor(image)).norm()) <= factor * float(delta.norm()) + 1e-12

    mapping = {"unit_per_value": 1 / 4095, "rescale": {"slope": 2.0}}
    record = radius_on_the_file(0.3, mapping, (stored, *native), channels, size)
    assert record["unit_image"] == pytest.approx(0.3 / factor)
    assert record["stored_values"] == pytest.approx(0.3 / factor * 4095 / 2)
    assert radius_on_the_file(0.3, {"unit_per_value": None}, (stored, *native), channels, size)["stored_values"] is None
