"""Figures of the chapters (plotly), from the tidy results: certified Dice against sigma and against
the radius, abstention maps side by side as the paper's Figure 1 (abstained pixels white).
``show`` displays a table or figure as HTML that needs only the plotly.js the book serves from
``_static`` (and as plotly's own mimetype for Jupyter), so the static site loads nothing from a CDN.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from medcert_core.render import colour_labels, grey_image, png_data_uri
from medcert_core.study.report.tables import (
    METRICS,
    reachable_curves,
    table_html,
    unreachable_note,
)


def dice_against_sigma(frame: pd.DataFrame, metric: str = "dice"):
    """Certified ``metric`` (mean per image) against sigma, one panel per class, one line per method x arch."""
    import plotly.express as px

    certified = frame[(frame["class_id"] > 0) & (frame["sigma"] > 0)]
    means = (certified.groupby(["method_label", "arch", "class_name", "class_id", "sigma", "radius"])[metric]
             .mean().reset_index().sort_values(["class_id", "sigma"]))
    means["model"] = means["method_label"] + " · " + means["arch"]
    figure = px.line(means, x="sigma", y=metric, color="model", facet_col="class_name", markers=True,
                     hover_data={"radius": ":.3f"}, labels={"sigma": "σ", metric: f"certified {METRICS[metric]}"},
                     range_y=[0, 1.02])
    sigmas = sorted(means["sigma"].unique())
    radii = means.drop_duplicates("sigma").set_index("sigma")["radius"]
    figure.update_xaxes(tickvals=sigmas, ticktext=[f"σ {s:g}<br>R {radii[s]:.2f}" for s in sigmas])
    figure.for_each_annotation(lambda annotation: annotation.update(text=annotation.text.split("=")[-1]))
    figure.update_layout(height=380, margin={"t": 40, "b": 10}, legend_title_text="")
    return figure


def dice_against_radius(curves: pd.DataFrame, metric: str = "dice"):
    """Certified ``metric`` (mean per image) against the radius R = sigma Phi^-1(tau), from one set
    of draws per run certified at every tau of its grid: one panel per class, one line per
    method x arch (colour) and sigma (dash). ``curves``: curve rows (``Experiment.curves``). Taus
    that n cannot reach (all-abstain by construction) are left out and named under the figure."""
    import plotly.express as px

    certified = reachable_curves(curves[curves["class_id"] > 0])
    means = (certified.groupby(["method_label", "arch", "class_name", "class_id", "sigma", "tau", "radius"])[metric]
             .mean().reset_index().sort_values(["class_id", "sigma", "tau"]))
    means["model"] = means["method_label"] + " · " + means["arch"]
    means["σ"] = means["sigma"].map(lambda sigma: f"σ {sigma:g}")
    figure = px.line(means, x="radius", y=metric, color="model", line_dash="σ", facet_col="class_name", markers=True,
                     hover_data={"tau": ":.2f", "radius": ":.3f"},
                     labels={"radius": "certified radius R", metric: f"certified {METRICS[metric]}"}, range_y=[0, 1.02])
    figure.for_each_annotation(lambda annotation: annotation.update(text=annotation.text.split("=")[-1]))
    figure.update_layout(height=400, margin={"t": 40, "b": 10}, legend_title_text="")
    note = unreachable_note(curves)
    if note:
        figure.add_annotation(text=note, showarrow=False, xref="paper", yref="paper", x=0, y=-0.18,
                              xanchor="left", font={"size": 11})
        figure.update_layout(margin={"t": 40, "b": 60})
    return figure


def abstention_maps(panels: dict[float, dict[str, np.ndarray]], titles: Sequence[str], image_index: int = 0):
    """The paper's Figure 1: one row per sigma, columns: noisy input, ground truth, then each method.

    panels: {sigma: {"noisy": (N,C,H,W), "target": (N,H,W), <title>: (N,H,W) labels, ...}}.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    columns = ["noisy input", "ground truth", *titles]
    sigmas = sorted(panels)
    figure = make_subplots(rows=len(sigmas), cols=len(columns), column_titles=columns,
                           row_titles=[f"σ = {sigma:g}" for sigma in sigmas],
                           horizontal_spacing=0.01, vertical_spacing=0.02)
    for row, sigma in enumerate(sigmas, start=1):
        maps = panels[sigma]
        images = [grey_image(maps["noisy"][image_index]), colour_labels(maps["target"][image_index])]
        images += [colour_labels(maps[title][image_index]) for title in titles]
        for column, rgb in enumerate(images, start=1):
            figure.add_trace(go.Image(source=png_data_uri(rgb), hoverinfo="skip"), row=row, col=column)
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(height=190 * len(sigmas) + 40, width=190 * len(columns), margin={"t": 30, "b": 0, "l": 0, "r": 30})
    return figure


def show_markdown(text: str) -> None:
    from IPython.display import Markdown, display

    display(Markdown(text))


def show(item) -> None:
    """Display a results table (DataFrame from ``paper_table``) or a plotly figure, CDN-free."""
    from IPython.display import HTML, display

    if isinstance(item, pd.DataFrame):
        display(HTML(table_html(item)))
        return
    html = item.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})
    display({"application/vnd.plotly.v1+json": json.loads(item.to_json()), "text/html": html}, raw=True)


def volume_slices(panels: dict[float, dict[str, np.ndarray]], axis: int,
                  image_index: int = 0) -> tuple[dict[float, dict[str, np.ndarray]], int]:
    """Volume panels cut to one slice: ``panels`` {sigma: {"noisy": (N, C, D, H, W), "target": (N, D, H, W),
    <title>: (N, D, H, W)}} -> the same keys with 2D slices ((N, C, h, w) and (N, h, w)) along spatial ``axis``
    (0: D, 1: H, 2: W), and the slice's index: the one holding the most foreground voxels (target > 0) of volume
    ``image_index``'s ground truth, the same at every sigma."""
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (D, H, W), got {axis!r}")
    target = next(iter(panels.values()))["target"][image_index]
    if target.ndim != 3:
        raise ValueError(f"expected volume panels (targets (N, D, H, W)), got a target of shape {target.shape}")
    other_axes = tuple(a for a in range(3) if a != axis)
    index = int(np.argmax((target > 0).sum(axis=other_axes)))
    return {sigma: {key: np.take(maps, index, axis=maps.ndim - 3 + axis) for key, maps in panel.items()}
            for sigma, panel in panels.items()}, index


def abstention_figure(experiment, arch: str, methods: Sequence, axis: int = 0):
    """The paper's Figure 1 for the first test image of a chapter's ``experiment``: noisy input, ground
    truth, each method's labels per sigma (abstained pixels white). A volume is cut along spatial ``axis``
    at its slice with the most ground-truth foreground (:func:`volume_slices`), named in the title."""
    panels = experiment.abstention_panels(arch, methods)
    titles = [method.label for method in methods]
    if next(iter(panels.values()))["target"].ndim == 3:  # (N, H, W): images
        return abstention_maps(panels, titles)
    cut, index = volume_slices(panels, axis)
    figure = abstention_maps(cut, titles)
    figure.update_layout(title_text=f"slice {index} of axis {'DHW'[axis]} ({arch})", margin={"t": 60})
    return figure
