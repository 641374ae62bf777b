"""Tables and figures of the chapters, from the tidy results.

``paper_table`` lays results out as the paper's Tables 1-3: one row per method x arch x sigma x R,
per class certified Dice, IoU and % abstain. Figures are plotly: certified Dice against sigma
(and R), certified Dice against the radius from one set of draws per run (``dice_against_radius``),
and abstention maps side by side as the paper's Figure 1 (abstained pixels white).
``show`` displays either, as HTML that needs only the plotly.js the book serves from ``_static``
(and as plotly's own mimetype for Jupyter), so the static site loads nothing from a CDN.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from medcert_core.certify import ABSTAIN

METRICS = {"dice": "Dice", "iou": "IoU", "abstain_in_class": "%⊘"}
ROW_KEYS = {"method_label": "method", "arch": "arch", "sigma": "σ", "radius": "R"}
# background black, abstain white, then one colour per foreground class
PALETTE = np.array([[0, 0, 0], [230, 75, 53], [77, 187, 213], [0, 160, 135], [243, 155, 127], [145, 209, 194],
                    [132, 145, 180], [220, 220, 0]], dtype=np.uint8)
ABSTAIN_COLOUR = np.array([255, 255, 255], dtype=np.uint8)


def paper_table(frame: pd.DataFrame, rows: Mapping[str, str] = ROW_KEYS) -> pd.DataFrame:
    """Mean per-image scores of the foreground classes in the paper's layout: one row per value of
    the ``rows`` columns (default method, arch, σ, R; renamed as given), columns (class, metric).

    %⊘ is the abstained share of the class's pixels; the last column, "all %⊘", of the whole image.
    """
    frame = frame[frame["class_id"] > 0]
    keys = list(rows)
    order = frame.drop_duplicates("class_name").sort_values("class_id")["class_name"].tolist()
    per_class = frame.pivot_table(index=keys, columns="class_name", values=list(METRICS), aggfunc="mean", sort=False)
    per_class = per_class.swaplevel(0, 1, axis=1).reindex(
        columns=pd.MultiIndex.from_product([order, list(METRICS)]))
    per_class.columns = pd.MultiIndex.from_tuples([(name, METRICS[metric]) for name, metric in per_class.columns])
    image_abstain = frame.drop_duplicates([*keys, "image_id"]).groupby(keys, sort=False)["abstain"].mean()
    per_class[("all", "%⊘")] = image_abstain
    per_class.index = per_class.index.set_names(list(rows.values()))
    per_class = per_class.rename(index=lambda value: round(value, 3) if isinstance(value, float) else value)
    return per_class.sort_index()


def table_html(table: pd.DataFrame, digits: int = 2) -> str:
    """HTML with ``digits`` decimals; results tables (MultiIndex columns, class ``medcert-results``)
    show %⊘ in percent, other tables get class ``medcert-table``."""
    shown = table.copy()
    if shown.columns.nlevels == 2:  # a paper_table: %⊘ as fractions
        for column in shown.columns:
            if column[1] == "%⊘":
                shown[column] = shown[column] * 100
    kind = "medcert-results" if shown.columns.nlevels > 1 else "medcert-table"
    return shown.to_html(float_format=lambda value: f"{value:.{digits}f}", na_rep="–", classes=kind, border=0)


def ranking_per_sigma(frame: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per sigma (> 0), each method's certified ``metric`` averaged over images and foreground classes
    (each class's per-image mean first), its rank (1 = best) and its gap to the best method.
    For the ablations, where the question is which variant certifies most."""
    certified = frame[(frame["class_id"] > 0) & (frame["sigma"] > 0)]
    per_class = certified.groupby(["sigma", "method_label", "class_name"])[metric].mean()
    means = per_class.groupby(["sigma", "method_label"]).mean().rename(f"mean certified {METRICS[metric]}")
    table = means.reset_index()
    column = f"mean certified {METRICS[metric]}"
    table["rank"] = table.groupby("sigma")[column].rank(ascending=False, method="min").astype(int)
    table["gap to best"] = table[column] - table.groupby("sigma")[column].transform("max")
    return table.rename(columns={"sigma": "σ", "method_label": "method"}).sort_values(["σ", "rank"]).set_index(["σ", "method"])


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


def reachable_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """The curve rows whose tau n can reach (``reachable``; rows stored before that column count as
    reachable): at a tau no n-draw count can certify, every pixel abstains by construction."""
    if "reachable" not in curves:
        return curves
    return curves[curves["reachable"].astype(bool)]


def unreachable_note(curves: pd.DataFrame) -> str:
    """One sentence naming the (sigma, tau) that n cannot reach, or "" when there are none."""
    if "reachable" not in curves:
        return ""
    out = curves[~curves["reachable"].astype(bool)]
    if out.empty:
        return ""
    taus = ", ".join(sorted({f"{tau:g}" for tau in out["tau"]}))
    draws = f"n = {', '.join(str(n) for n in sorted(set(out['n'])))} draws" if "n" in out else "n draws"
    return f"not drawn: tau = {taus}, which {draws} cannot reach (every pixel abstains by construction)"


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


def radius_curve_table(curves: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """The curves' values: mean certified ``metric`` per class and the abstained share of the image,
    one row per method x arch x sigma x tau (with R); at a tau that n cannot reach, the values are
    empty and "n reaches τ" says no (every pixel abstains by construction)."""
    keys = ["method_label", "arch", "sigma", "tau", "radius"]
    foreground = curves[curves["class_id"] > 0]
    table = foreground.pivot_table(index=keys, columns="class_name", values=metric, aggfunc="mean", sort=False)
    table["%⊘ all"] = foreground.drop_duplicates([*keys, "image_id"]).groupby(keys, sort=False)["abstain"].mean() * 100
    if "reachable" in foreground:
        reachable = foreground.groupby(keys, sort=False)["reachable"].all().astype(bool)
        table = table.where(reachable.reindex(table.index), np.nan)
        table["n reaches τ"] = reachable.reindex(table.index).map({True: "yes", False: "no"})
    table.index = table.index.set_names(["method", "arch", "σ", "τ", "R"])
    table.columns.name = None
    return table.rename(index=lambda value: round(value, 3) if isinstance(value, float) else value).sort_index()


def colour_labels(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids or ABSTAIN -> (H, W, 3) uint8: background black, abstain white."""
    rgb = PALETTE[np.clip(labels, 0, len(PALETTE) - 1)]
    rgb[labels == ABSTAIN] = ABSTAIN_COLOUR
    return rgb


def grey_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) float image (any range) -> (H, W, 3) uint8, clipped to [0, 1]."""
    rgb = image.mean(0, keepdims=True).repeat(3, 0) if image.shape[0] != 3 else image
    return (np.clip(rgb.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)


def png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def abstention_maps(panels: dict[float, dict[str, np.ndarray]], titles: Sequence[str], image_index: int = 0):
    """The paper's Figure 1: one row per sigma, columns: noisy input, ground truth, then each method.

    panels: {sigma: {"noisy": (N,C,H,W), "target": (N,H,W), <title>: (N,H,W) labels, ...}}.
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

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
