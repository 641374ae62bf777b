"""Live controls for a chapter run in Jupyter: pick a test image and a sigma, certify it again.

The static website never shows these (the grid runs chapters with ``interactive = False``); it
shows the stored plotly figures instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medcert_core.smoothing import resolve_device
from medcert_core.study.experiment import Experiment
from medcert_core.study.report import abstention_maps
from medcert_core.study.runs import Method, smoothed_segmenter


def certify_one(experiment: Experiment, arch: str, methods: Sequence[Method], index: int, sigma: float):
    """Certify test image ``index`` at ``sigma`` with each method; returns the abstention figure (one row)."""
    image, target = experiment.data.load("test")[index]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(index))
    panel = {"noisy": (image + sigma * noise).numpy()[None], "target": target.numpy()[None]}
    device = resolve_device(experiment.device)
    for method in methods:
        run = experiment.certification_run(arch, method, sigma)
        smoothed, _ = smoothed_segmenter(run, experiment.cache_path, device, experiment.execution)
        generator = torch.Generator(device=device).manual_seed(experiment.seed)
        certificate = smoothed.certify(image, run.n0, run.n, tau=run.tau, alpha=run.alpha, generator=generator)
        panel[method.label] = certificate.labels.cpu().numpy()[None]
    return abstention_maps({float(sigma): panel}, [method.label for method in methods])


def controls(experiment: Experiment, arch: str, methods: Sequence[Method]):
    """An ipywidgets box: image and sigma pickers, a button that re-certifies and shows the maps."""
    import ipywidgets as widgets
    from IPython.display import display

    test_set = experiment.data.load("test")
    image = widgets.Dropdown(options=[(str(name), i) for i, name in enumerate(test_set.ids)], description="image")
    sigma = widgets.Dropdown(options=[float(s) for s in experiment.sigmas], description="σ")
    button = widgets.Button(description="certify", button_style="primary")
    output = widgets.Output()

    def on_click(_) -> None:
        output.clear_output()
        with output:
            print(f"certifying {test_set.ids[image.value]} at σ = {sigma.value:g} ...")
            figure = certify_one(experiment, arch, methods, image.value, sigma.value)
            output.clear_output()
            figure.show()

    button.on_click(on_click)
    box = widgets.VBox([widgets.HBox([image, sigma, button]), output])
    display(box)
    return box
