"""Live controls for a chapter run in Jupyter: pick a test image and a sigma, certify it again.

The static website never shows these (the grid runs chapters with ``interactive = False``); it
shows the stored plotly figures instead.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import numpy as np
import torch

from medcert_core.devices import resolve_device
from medcert_core.metrics import segmentation_scores
from medcert_core.smoothing import image_seed
from medcert_core.study.experiment import Experiment
from medcert_core.study.report.figures import abstention_maps, show
from medcert_core.study.runs.run import Method, smoothed_segmenter

OnMethod = Callable[[int, Method], None]  # called with (k, method) before method k (0-based) is certified


def certify_labels(experiment: Experiment, arch: str, method: Method, image: torch.Tensor, sigma: float,
                   seed: int) -> np.ndarray:
    """``method``'s certified labels (H, W) of ``image`` at ``sigma`` with noise seeded by ``seed``;
    ABSTAIN where it abstains."""
    run = experiment.certification_run(arch, method, sigma)
    device = resolve_device(experiment.device)
    smoothed, _ = smoothed_segmenter(run, experiment.cache_path, device, experiment.execution)
    generator = torch.Generator(device=device).manual_seed(seed)
    certificate = smoothed.certify(image, run.n0, run.n, tau=run.tau, alpha=run.alpha, generator=generator)
    return certificate.labels.cpu().numpy()


def certify_panel(experiment: Experiment, arch: str, methods: Sequence[Method], index: int, sigma: float,
                  on_method: OnMethod | None = None) -> dict[str, np.ndarray]:
    """Test image ``index`` at ``sigma``: {"noisy", "target", <method label>: labels}, each with a leading axis of 1."""
    test_set = experiment.data.load("test")
    image, target = test_set[index]
    seed = image_seed(experiment.seed, test_set.ids[index])  # the stored runs' noise for this image
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(index))
    panel = {"noisy": (image + sigma * noise).numpy()[None], "target": target.numpy()[None]}
    for k, method in enumerate(methods):
        if on_method is not None:
            on_method(k, method)
        panel[method.label] = certify_labels(experiment, arch, method, image, sigma, seed)[None]
    return panel


def summary(panel: dict[str, np.ndarray], labels: Sequence[str], num_classes: int) -> list[str]:
    """One line per method: the share of pixels that abstain and the certified Dice, mean over the
    foreground classes (background excluded, as in the tables)."""
    lines = []
    for label in labels:
        scores = segmentation_scores(panel[label][0], panel["target"][0], num_classes)
        dice = np.nanmean(scores["dice"][1:])
        lines.append(f"{label}: {100 * scores['abstain']:.1f} % abstain, certified Dice {dice:.3f} (foreground)")
    return lines


def controls(experiment: Experiment, arch: str, methods: Sequence[Method]):
    """An ipywidgets box: image and sigma pickers and a button that re-certifies, then shows the maps and
    their numbers. While it runs the pickers are disabled and a progress bar counts the methods."""
    import ipywidgets as widgets
    from IPython.display import display

    test_set = experiment.data.load("test")
    labels = [method.label for method in methods]
    image = widgets.Dropdown(options=[(str(name), i) for i, name in enumerate(test_set.ids)], description="image")
    sigma = widgets.Dropdown(options=[float(s) for s in experiment.sigmas], description="σ")
    button = widgets.Button(description="certify", button_style="primary")
    progress = widgets.IntProgress(value=0, max=len(methods), layout=widgets.Layout(display="none"))
    status = widgets.Label().add_class("medcert-live-status")
    numbers = widgets.HTML().add_class("medcert-live-numbers")
    output = widgets.Output()

    def set_busy(busy: bool) -> None:
        for widget in (image, sigma, button):
            widget.disabled = busy
        progress.layout.display = "" if busy else "none"

    def on_click(_) -> None:
        name, chosen = test_set.ids[image.value], sigma.value

        def step(k: int, method: Method) -> None:
            progress.value = k
            status.value = f"certifying {name} at σ = {chosen:g} (method {k + 1} of {len(methods)}: {method.label})"

        set_busy(True)
        output.clear_output()
        numbers.value = ""
        with output:
            try:
                panel = certify_panel(experiment, arch, methods, image.value, chosen, on_method=step)
                show(abstention_maps({float(chosen): panel}, labels))
                numbers.value = "<br>".join(map(html.escape, summary(panel, labels, len(test_set.class_names))))
                status.value = f"certified {name} at σ = {chosen:g}"
            except Exception:
                status.value = f"certifying {name} at σ = {chosen:g} failed (traceback below)"
                raise  # the output shows it
            finally:
                set_busy(False)

    button.on_click(on_click)
    box = widgets.VBox([widgets.HBox([image, sigma, button]), widgets.HBox([progress, status]), numbers, output])
    box.add_class("medcert-live")
    display(box)
    return box
