"""Tables of the chapters, from the tidy results.

``paper_table`` lays results out as the paper's Tables 1-3: one row per method x arch x sigma x R,
per class certified Dice, IoU and % abstain; ``radius_curve_table`` the radius curves' values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medcert_core.metrics import paired_bootstrap_interval, seeds_and_images_bootstrap_interval

METRICS = {"dice": "Dice", "iou": "IoU", "abstain_in_class": "%⊘"}
ROW_KEYS = {"method_label": "method", "arch": "arch", "sigma": "σ", "radius": "R"}


def paper_table(frame: pd.DataFrame, rows: Mapping[str, str] = ROW_KEYS) -> pd.DataFrame:
    """Mean per-image scores of the foreground classes in the paper's layout: one row per value of
    the ``rows`` columns (default method, arch, σ, R; renamed as given), columns (class, metric).

    %⊘ is the abstained share of the class's pixels; the last column, "all %⊘", of the whole image.
    With a ``training_seed`` column the means are over seeds and images (:func:`seeds_table` gives the spread).
    """
    frame = frame[frame["class_id"] > 0]
    keys = list(rows)
    order = frame.drop_duplicates("class_name").sort_values("class_id")["class_name"].tolist()
    per_class = frame.pivot_table(index=keys, columns="class_name", values=list(METRICS), aggfunc="mean", sort=False)
    per_class = per_class.swaplevel(0, 1, axis=1).reindex(
        columns=pd.MultiIndex.from_product([order, list(METRICS)]))
    per_class.columns = pd.MultiIndex.from_tuples([(name, METRICS[metric]) for name, metric in per_class.columns])
    seeds = ["training_seed"] if "training_seed" in frame else []
    image_abstain = frame.drop_duplicates([*keys, *seeds, "image_id"]).groupby(keys, sort=False)["abstain"].mean()
    per_class[("all", "%⊘")] = image_abstain
    per_class.index = per_class.index.set_names(list(rows.values()))
    per_class = per_class.rename(index=lambda value: round(value, 3) if isinstance(value, float) else value)
    return per_class.sort_index()


def seeds_table(frame: pd.DataFrame, metric: str = "dice", rows: Mapping[str, str] = ROW_KEYS) -> pd.DataFrame:
    """The certified ``metric`` of each foreground class per training seed (mean over images), with the mean
    over seeds and their standard deviation: how much repeating the training moves a row. One row per
    value of the ``rows`` columns (renamed as given), columns (class, "seed <s>" ... "mean", "sd")."""
    frame = frame[frame["class_id"] > 0]
    if "training_seed" not in frame:
        frame = frame.assign(training_seed=0)
    keys = [key for key in rows if key in frame]
    per_seed = frame.pivot_table(index=[*keys, "class_name"], columns="training_seed", values=metric,
                                 aggfunc="mean", sort=False)
    per_seed.columns = [f"seed {seed}" for seed in per_seed.columns]
    per_seed["mean"] = per_seed.mean(axis=1)
    per_seed["sd"] = per_seed.drop(columns="mean").std(axis=1, ddof=1)
    order = frame.drop_duplicates("class_name").sort_values("class_id")["class_name"].tolist()
    table = per_seed.unstack("class_name").swaplevel(0, 1, axis=1)
    table = table.reindex(columns=pd.MultiIndex.from_product([order, list(per_seed.columns)]))
    table.index = table.index.set_names([rows[key] for key in keys])
    return table.rename(index=lambda value: round(value, 3) if isinstance(value, float) else value).sort_index()


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


def paired_differences(frame: pd.DataFrame, reference: str, metric: str = "dice", confidence: float = 0.95,
                       resamples: int = 10_000, between: str = "method_label") -> pd.DataFrame:
    """Each method (``between="arch"``: each architecture) against ``reference`` (a method label, or an
    architecture), image by image: per arch (method), sigma (> 0), compared method (arch) and foreground
    class, the mean over test images of (compared - reference) in the certified ``metric`` with its paired
    percentile bootstrap interval (``metrics.paired_bootstrap_interval``, images resampled); class "all %⊘"
    is the difference in the abstained share of the whole image.

    With a ``training_seed`` column holding several seeds (the same runs repeated with models trained
    from other seeds, e.g. ``Experiment.run_seeds``), the interval resamples seeds as well as images
    (``metrics.seeds_and_images_bootstrap_interval``) and the rows also give ``seeds`` and
    ``seed_spread`` (the standard deviation over seeds of each seed's mean difference).

    Images where either side has no value (a class absent from the image) are left out of that pair
    (for every seed). Long format: columns arch, σ, method, class, mean, low, high, images, ahead
    ("yes": the interval lies above 0, "no": below 0, "–": it holds 0); with ``between="arch"`` also
    ``reference``.
    """
    if between not in ("method_label", "arch"):
        raise ValueError(f"between must be 'method_label' or 'arch', got {between!r}")
    within = "arch" if between == "method_label" else "method_label"
    certified = frame[(frame["class_id"] > 0) & (frame["sigma"] > 0)]
    if reference not in set(certified[between]):
        what = "methods" if between == "method_label" else "architectures"
        raise ValueError(f"reference {reference!r} is not among the {what} {sorted(set(certified[between]))}")
    if "training_seed" not in certified:
        certified = certified.assign(training_seed=0)
    seeded = certified["training_seed"].nunique() > 1
    index = [within, "sigma", "class_name", "training_seed", "image_id"]
    per_class = certified.pivot_table(index=index, columns=between, values=metric, aggfunc="first", dropna=False)
    image = certified.drop_duplicates(["arch", "sigma", "method_label", "training_seed", "image_id"])
    per_image = image.assign(class_name="all %⊘").pivot_table(index=index, columns=between, values="abstain",
                                                              aggfunc="first", dropna=False)
    rows = []
    for table in (per_class, per_image):
        for (fixed, sigma, class_name), group in table.groupby(level=[0, 1, 2], sort=False):
            for compared in [label for label in group.columns if label != reference]:
                differences = (group[compared] - group[reference]).droplevel([0, 1, 2]).unstack("image_id")
                differences = differences.dropna(axis=1).to_numpy()  # (seeds, images)
                if differences.shape[1] < 2:
                    continue
                interval = (seeds_and_images_bootstrap_interval(differences, confidence, resamples) if seeded
                            else paired_bootstrap_interval(differences[0], confidence=confidence, resamples=resamples))
                arch, method = (fixed, compared) if between == "method_label" else (compared, fixed)
                rows.append({"arch": arch, "σ": sigma, "method": method, "class": class_name,
                             "mean": interval["mean"], "low": interval["low"], "high": interval["high"],
                             "images": interval["images"], "ahead": _side_of_zero(interval),
                             **({"seeds": interval["seeds"], "seed_spread": interval["seed_spread"]} if seeded else {}),
                             **({"reference": reference} if between == "arch" else {})})
    order = {**certified.groupby("class_name")["class_id"].first().to_dict(), "all %⊘": np.inf}
    result = pd.DataFrame(rows)
    if result.empty:
        return result
    return result.sort_values(["arch", "σ", "method", "class"], key=lambda column: column.map(order)
                              if column.name == "class" else column, kind="stable").reset_index(drop=True)


def _side_of_zero(interval: Mapping[str, float]) -> str:
    return "yes" if interval["low"] > 0 else "no" if interval["high"] < 0 else "–"


def paired_table(differences: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """``paired_differences`` as a chapter shows it: one row per arch x method x σ, one column per
    class, "+0.05 [+0.01, +0.09]" (abstention in percentage points); over several training seeds also the
    standard deviation over seeds of each seed's mean difference, "+0.05 [+0.01, +0.09] sd 0.02"."""
    def cell(row: pd.Series) -> str:
        scale = 100 if row["class"] == "all %⊘" else 1
        shown = digits if scale == 1 else 1
        spread = f" sd {row['seed_spread'] * scale:.{shown}f}" if row.get("seeds", 1) > 1 else ""
        return (f"{row['mean'] * scale:+.{shown}f} [{row['low'] * scale:+.{shown}f}, {row['high'] * scale:+.{shown}f}]"
                + spread)

    if differences.empty:  # fewer than 2 images per pair: no interval
        return pd.DataFrame({"note": ["fewer than 2 test images per pair: no paired intervals"]})
    shown = differences.assign(cell=differences.apply(cell, axis=1))
    order = list(dict.fromkeys(differences["class"]))
    table = shown.pivot_table(index=["arch", "method", "σ"], columns="class", values="cell", aggfunc="first", sort=False)
    table = table.reindex(columns=order)
    table.columns.name = None
    return table.sort_index()


def benchmark_table(path: str | Path, index: Sequence[str] = ("architecture", "method"),
                    key: str = "rows") -> pd.DataFrame:
    """The list ``key`` of a committed benchmark JSON (``path`` relative to the project root, e.g.
    ``benchmarks/results/bench_volume_certify.json``) as a table indexed by ``index``, without list-valued
    columns; its caption-worthy context (machine, load, commit) stays in the JSON."""
    from medcert_core.study.experiment import project_root

    path = Path(path) if Path(path).is_absolute() else project_root() / path
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark results at {path}: run the benchmark script that writes it")
    rows = pd.DataFrame(json.loads(path.read_text())[key])
    listed = [column for column in rows if rows[column].map(lambda value: isinstance(value, list)).any()]
    return rows.drop(columns=listed).set_index(list(index))
