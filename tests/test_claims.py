"""Every number the docs quote from a committed JSON must still be what that JSON says.

Each claim below names a Markdown file, the sentence or table cells that quote the number (with
``{}`` where each value goes), the committed JSON it comes from (an executed notebook is JSON too:
its papermill metadata), and how to read and round each value. The test fills the values in from
the JSON and asserts the filled-in text is in the Markdown, whitespace and line breaks ignored.
So a JSON that is rewritten with other numbers, or a sentence edited away from its source, fails
here. A claim that is reworded on purpose must be reworded here too.

Rounding is Python's format spec, e.g. ``".2f"``; on an exact rounding tie (150.5) both the
binary and the half-up rounding are accepted. ``signed2`` (``signed3``, ...) writes a leading ``+`` and
the Unicode minus the tables use, with 2 (3, ...) decimals.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import subprocess
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINUS = "\u2212"


# --- reading and formatting ------------------------------------------------------------------

@lru_cache(maxsize=None)
def load(source: str) -> Any:
    """A committed JSON: ``path`` in the work tree, or ``REV:path`` as committed in REV (``git show``)."""
    if ":" in source:
        return json.loads(subprocess.run(["git", "show", source], cwd=ROOT, capture_output=True, text=True,
                                         check=True).stdout)
    return json.loads((ROOT / source).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def markdown(path: str) -> str:
    return " ".join((ROOT / path).read_text(encoding="utf-8").split())


def get(data: Any, path: tuple) -> Any:
    """Follow ``path``: a str or int indexes; a dict picks the one list element with those fields."""
    for step in path:
        if isinstance(step, dict):
            matches = [item for item in data if all(item.get(key) == value for key, value in step.items())]
            assert len(matches) == 1, f"{step} matches {len(matches)} elements, not one"
            data = matches[0]
        else:
            data = data[step]
    return data


def fmt(value: float, spec: str) -> frozenset[str]:
    """``value`` written with ``spec``: the ways a careful writer may have rounded it.

    Python's ``format`` rounds the binary value (0.9355 -> 0.935); rounding its decimal repr half
    up gives 150.5 -> 151. Where the two differ, either is accepted; elsewhere there is one text.
    """
    if spec.startswith("signed"):
        return signed(value, int(spec[len("signed"):]))
    written = {format(value, spec)}
    fixed = re.fullmatch(r"([+,]*)\.(\d+)f", spec)
    if fixed:
        exact = Decimal(repr(value)).quantize(Decimal(1).scaleb(-int(fixed.group(2))), rounding=ROUND_HALF_UP)
        written.add(format(exact, spec))
    return frozenset(written)


def signed(value: float, digits: int) -> frozenset[str]:
    """``+0.28`` or ``−0.27``: a leading sign, with the Unicode minus the tables use."""
    return frozenset(text.replace("-", MINUS) for text in fmt(value, f"+.{digits}f"))


def fill(template: str, *values: frozenset[str]) -> frozenset[str]:
    """``template`` with each ``{}`` filled by one of its value's texts, in every combination."""
    return frozenset(template.format(*choice) for choice in itertools.product(*(sorted(v) for v in values)))


Value = Callable[[Any], frozenset]


def at(*path, spec: str = ".2f") -> Value:
    """The number at ``path``, formatted with ``spec``."""
    return lambda data: fmt(get(data, path), spec)


def calc(function: Callable[[Any], float], spec: str = ".2f") -> Value:
    """A number computed from the JSON (a difference, a mean), formatted with ``spec``."""
    return lambda data: fmt(function(data), spec)


@dataclass(frozen=True)
class Claim:
    markdown: str
    text: str
    source: str
    values: tuple[Value, ...]

    def expected(self, data: Any = None) -> frozenset[str]:
        """Every acceptable text of the claim (one, unless a value sits on a rounding tie)."""
        data = load(self.source) if data is None else data
        return frozenset(" ".join(text.split()) for text in fill(self.text, *(value(data) for value in self.values)))

    def stated_in(self, text: str, data: Any = None) -> bool:
        return any(candidate in text for candidate in self.expected(data))

    @property
    def name(self) -> str:
        return f"{self.markdown}: {' '.join(self.text.split())[:70]}"


# --- helpers for the recurring shapes of the JSONs ---------------------------------------------

def psnr(sigma: float, denoiser: str) -> Value:
    return at("rows", {"sigma": sigma, "denoiser": denoiser}, "psnr_db")


def psnr_gap(sigma: float, ahead: str, behind: str, spec: str = ".2f") -> Value:
    return calc(lambda d: get(d, ("rows", {"sigma": sigma, "denoiser": ahead}, "psnr_db"))
                - get(d, ("rows", {"sigma": sigma, "denoiser": behind}, "psnr_db")), spec)


def paired_cell(sigma: float, denoiser: str) -> Value:
    """``32.67 (+0.28 [−0.27, +0.87])``: the row's PSNR and its paired difference from single-step."""
    def cell(data: Any) -> frozenset[str]:
        mean = get(data, ("rows", {"sigma": sigma, "denoiser": denoiser}, "psnr_db"))
        pair = get(data, ("paired_against_single_step", {"sigma": sigma, "denoiser": denoiser}))
        return fill("{} ({} [{}, {}])", fmt(mean, ".2f"), signed(pair["mean_db"], 2), signed(pair["low_db"], 2),
                    signed(pair["high_db"], 2))
    return cell


FP32_GATES = "9c73776:"  # the gate JSONs as measured on the fp32 trainings, before the bf16 ones replaced them


def largest_psnr_change(before: Any, after: Any, denoiser: str | None = None) -> float:
    """The largest PSNR difference (dB) between two gate JSONs over the (sigma, denoiser) rows they share
    (only ``denoiser``'s rows, if given)."""
    psnr = lambda data: {(row["sigma"], row["denoiser"]): row["psnr_db"] for row in data["rows"]
                         if denoiser in (None, row["denoiser"])}
    first, second = psnr(before), psnr(after)
    return max(abs(first[key] - second[key]) for key in first.keys() & second.keys())


def lead_over_sigmas(pick: Callable[[Iterable[float]], float], rival: Callable[[str], bool]) -> Value:
    """The least or largest lead (dB) of single-step over the rival denoisers ``rival`` accepts, over the sigmas."""
    return calc(lambda data: pick(-row["mean_db"] for row in data["paired_against_single_step"] if rival(row["denoiser"])),
                ".1f")


def lead(sigma: float, denoiser: str, spec: str) -> Value:
    """How far single-step is ahead of ``denoiser``, with its paired interval, as ``0.94 [0.86, 1.02]``."""
    def text(data: Any) -> frozenset[str]:
        pair = get(data, ("paired_against_single_step", {"sigma": sigma, "denoiser": denoiser}))
        return fill("{} [{}, {}]", fmt(-pair["mean_db"], spec), fmt(-pair["high_db"], spec), fmt(-pair["low_db"], spec))
    return text


def resize_certified(shrink: str, sigma: float) -> Value:
    """Mean certified Dice of lung / heart / clavicle over the images, and the mean % abstained."""
    def text(data: Any) -> frozenset[str]:
        rows = [row for row in data["certify"]["rows"] if row["shrink"] == shrink and row["sigma"] == sigma]
        dice = [statistics.fmean(row["dice"] for row in rows if row["class_name"] == name)
                for name in ("lung", "heart", "clavicle")]
        abstain = statistics.fmean({row["image_id"]: row["abstain"] for row in rows}.values())
        return fill("{} / {} / {}, {} %", *(fmt(value, ".2f") for value in dice), fmt(100 * abstain, ".1f"))
    return text


def attack(method: str, sigma: float, key: str, spec: str = "d") -> Value:
    return at("summary", {"method_label": method, "sigma": sigma}, key, spec=spec)


def sharp(method: str, sigma: float, pixels: int, key: str, spec: str) -> Value:
    return at("group_summary", {"method_label": method, "sigma": sigma, "group_pixels": pixels}, key, spec=spec)


def sequential(sigma: str, n_max: str, rule: str, *path, spec: str) -> Value:
    return at("sigmas", sigma, "at_tau", n_max, rule, *path, spec=spec)


def pipeline(setting: str, key: str = "seconds_per_image", spec: str = ".2f") -> Value:
    return at("medcert", setting, key, spec=spec)


def pipeline_split(setting: str) -> Value:
    def text(data: Any) -> frozenset[str]:
        split = data["medcert"][setting]["split"]
        return fill("{} / {} / {}", fmt(split["denoiser_seconds"], ".2f"), fmt(split["segmenter_seconds"], ".2f"),
                    fmt(split["statistics_seconds"], ".3f"))
    return text


def load_range(data: Any) -> frozenset[str]:
    """``1.3 to 2.2``: the lowest and highest load average the benchmark recorded, start and end."""
    device = data["device"]
    loads = [*device["load_average_at_start"], *device["load_average_at_end"]]
    return fill("{} to {}", fmt(min(loads), ".1f"), fmt(max(loads), ".1f"))


# --- executed notebooks: their output tables and text -------------------------------------------

class _Tables(HTMLParser):
    """The rows of every HTML table, as lists of cell texts, a rowspan's text repeated down its rows."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.spans: dict[int, list] = {}
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.rowspan = 1

    def fill_spans(self) -> None:
        while len(self.row) in self.spans:
            column = len(self.row)
            text, left = self.spans[column]
            self.row.append(text)
            if left > 1:
                self.spans[column] = [text, left - 1]
            else:
                del self.spans[column]

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.spans = {}
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.fill_spans()
            self.cell, self.rowspan = [], int(dict(attrs).get("rowspan") or 1)

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            text = " ".join("".join(self.cell).split())
            if self.rowspan > 1:
                self.spans[len(self.row)] = [text, self.rowspan - 1]
            self.row.append(text)
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.fill_spans()
            self.rows.append(self.row)
            self.row = None


def _outputs(notebook: Any, kind: str, code: str = "") -> list[str]:
    """The ``kind`` outputs of the code cells whose source contains ``code``."""
    return ["".join(output["data"][kind]) for cell in notebook["cells"]
            if cell["cell_type"] == "code" and code in "".join(cell["source"])
            for output in cell.get("outputs", []) if kind in output.get("data", {})]


def cell(*key: str, column: int, code: str, spec: str | None = None) -> Value:
    """Column ``column`` of the row that starts with the cells ``key``, in the output table of the
    code cell whose source contains ``code``: as printed, or re-rounded with ``spec`` (a printed
    28.75 may be 28.7 or 28.8 at one decimal, so both are accepted), or with ``spec="minus"`` the
    table's ASCII minus written as the Unicode one."""
    def text(notebook: Any) -> frozenset[str]:
        parser = _Tables()
        for html in _outputs(notebook, "text/html", code):
            parser.feed(html)
        found = {tuple(row) for row in parser.rows if tuple(row[:len(key)]) == key}
        assert len(found) == 1, f"{len(found)} different rows start with {key} in the output of {code!r}"
        printed = next(iter(found))[column]
        if spec == "minus":
            return frozenset({printed.replace("-", MINUS)})
        if spec is None:
            return frozenset({printed})
        half = 0.5 * 10.0 ** -len(printed.partition(".")[2])
        value = float(printed)
        return fmt(value - 0.999 * half, spec) | fmt(value, spec) | fmt(value + 0.999 * half, spec)
    return text


def printed_number(value: Value, data: Any) -> float:
    """The number a one-text ``value`` prints in ``data`` (its first word: the mean of "+0.04 [+0.02, +0.06]")."""
    return float(next(iter(value(data))).split()[0])


def reversed_difference(value: Value) -> Value:
    """``-0.01 [-0.01, -0.00]`` (ours minus SegCertify) read the other way: ``0.01 [0.00, 0.01]``."""
    def text(notebook: Any) -> frozenset[str]:
        out = set()
        for printed in value(notebook):
            mean, low, high = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", printed).groups()
            flip = lambda number: number[1:] if number.startswith("-") else "-" + number.lstrip("+")
            out.add(f"{flip(mean)} [{flip(high)}, {flip(low)}]")
        return frozenset(out)
    return text


def said(pattern: str, group: int = 1) -> Value:
    """The ``group`` of the first match of ``pattern`` in the notebook's Markdown outputs."""
    def text(notebook: Any) -> frozenset[str]:
        match = re.search(pattern, " ".join(_outputs(notebook, "text/markdown", "")))
        assert match, f"no output matches {pattern!r}"
        return frozenset({match.group(group)})
    return text


SIGMAS = ("0.25", "0.50", "1.00")  # as the chapters' tables print them


def certified_row(method: str, arch: str, sigma: str, code: str) -> tuple[Value, ...]:
    """A three-class chapter's ``lung / heart / clavicle, % abstain`` at one σ, from its paper-layout table."""
    return (*(cell(method, arch, sigma, column=column, code=code) for column in (4, 7, 10)),
            cell(method, arch, sigma, column=13, spec=".1f", code=code))


def dice_row(method: str, arch: str) -> tuple[Value, ...]:
    """A chapter's paper-layout row as ``lung / heart / clavicle, % abstain`` at each of the three σ."""
    return tuple(value for sigma in SIGMAS for value in certified_row(method, arch, sigma, "paper_table"))


def ranked(sigma: str, method: str, column: int = 2, unsigned: bool = False) -> Value:
    """A cell of the chapter's ranking table (2: mean certified Dice; 4: gap to the best)."""
    value = cell(sigma, method, column=column, code="ranking_per_sigma")
    return (lambda notebook: frozenset(text.lstrip("-") for text in value(notebook))) if unsigned else value


OURS, SEGCERTIFY = "ours (ddpm, single-step)", "SegCertify"
GATE, GATE_VAL = "results/jsrt_denoiser_gate.json", "results/jsrt_denoiser_gate_val.json"
CXR_GATE, CVC_GATE = "results/cxr_lungs_denoiser_gate_val.json", "results/cvc_clinicdb_denoiser_gate_val.json"
SINGLE, MULTI, UNET = "ddpm single-step", "ddpm multi-step", "unet denoiser"
FFDNET_BOX, FFDNET_RAW = "ffdnet (box shrink above 75/255)", "ffdnet (no shrink)"
RESULTS, PERFORMANCE, REFERENCE = "results/README.md", "book/performance.md", "book/reference.md"
MONTGOMERY, SHENZHEN = "book/montgomery.ipynb", "book/shenzhen.ipynb"
MONTGOMERY_GATE = "results/montgomery_denoiser_gate_val.json"


FFDNET_OURS = "ours (ffdnet, FFDNet, natural images only)"


ARCH_LABELS = {"resunetpp": "ResUNet++", "unet": "UNet", "deeplabv2": "DeepLabV2"}


def ours_dice(arch: str = "resunetpp") -> tuple[Value, ...]:
    """Ours' certified Dice with ``arch`` at sigma 0.25 / 0.5 / 1.0, from a dataset chapter's per-architecture table."""
    return tuple(cell(OURS, arch, sigma, column=4, code="paper_table(per_arch)") for sigma in SIGMAS)


def dataset_chapter_claims(notebook: str, paper: dict[str, tuple[str, str, str]], target: str = "lung",
                           segcertify_paper: tuple[str, str, str] | None = None,
                           archs: tuple[str, ...] = tuple(ARCH_LABELS)) -> list[Claim]:
    """A chapter of the dataset template in results/README.md: the certified ``target`` Dice and whole-image
    abstention per architecture and sigma (ours, with the paper's numbers in brackets for the architectures
    ``paper`` names, and SegCertify with the first of ``archs``, with ``segcertify_paper``'s), ours minus
    SegCertify (Dice and abstention) and each other architecture minus the first."""
    first = ARCH_LABELS[archs[0]]

    def row(label: str, method: str, arch: str, code: str, papers: tuple[str, ...] | None) -> Claim:
        cells = [f"{{}}, {{}} % [{value}]" if papers else "{}, {} %" for value in (papers or ("",) * 3)]
        return Claim(RESULTS, f"| {label} | {' | '.join(cells)} |", notebook, tuple(
            value for sigma in SIGMAS for value in (cell(method, arch, sigma, column=4, code=code),
                                                    cell(method, arch, sigma, column=7, spec=".1f", code=code))))

    return [
        *[row(f"ours, {ARCH_LABELS[arch]}", OURS, arch, "paper_table(per_arch)", paper.get(arch)) for arch in archs],
        row(f"SegCertify, {first}", SEGCERTIFY, archs[0], "paper_table(comparison)", segcertify_paper),
        Claim(RESULTS, f"| ours − SegCertify, {first}, {target} Dice | {{}} | {{}} | {{}} |", notebook,
              tuple(cell(archs[0], OURS, sigma, column=3, spec="minus", code="ours_against_segcertify")
                    for sigma in SIGMAS)),
        Claim(RESULTS, f"| the same, abstention (points) | {{}} | {{}} | {{}} |", notebook,
              tuple(cell(archs[0], OURS, sigma, column=4, spec="minus", code="ours_against_segcertify")
                    for sigma in SIGMAS)),
        *[Claim(RESULTS, f"| {ARCH_LABELS[arch]} − {first} (ours), {target} Dice | {{}} | {{}} | {{}} |", notebook,
                tuple(cell(arch, OURS, sigma, column=3, spec="minus", code="architectures_against_first")
                      for sigma in SIGMAS))
          for arch in archs[1:]],
    ]


def interval_part(text: str, index: int) -> str:
    """The mean (0), low (1) or high (2) of a printed "+0.04 [+0.02, +0.06] sd 0.02"."""
    return text.replace("[", "").replace("]", "").replace(",", "").split()[index]


def against_segcertify(arch: str, sigma: str, column: int = 3, transform: Callable[[str], str] = str) -> Value:
    """A cell of a chapter's ours-minus-SegCertify table (Unicode minus), transformed (e.g. its mean alone)."""
    return calc_from(cell(arch, OURS, sigma, column=column, spec="minus", code="ours_against_segcertify"), transform)


def ffdnet_difference(sigma: str, column: int = 3, spec: str | None = "minus") -> Value:
    """A cell of a chapter's FFDNet-minus-its-DDPM table in front of ResUNet++ (3: Dice, 4: abstention)."""
    return cell("resunetpp", FFDNET_OURS, sigma, column=column, spec=spec, code="other_denoisers_against_ours")


def unsigned_mean(value: Value) -> Value:
    """The mean alone of a paired cell such as "−0.02 [−0.02, −0.01]", without its sign ("0.02")."""
    return calc_from(value, lambda text: text.split()[0].lstrip("+" + MINUS))


def ffdnet_against_ddpm(notebook: str, images: int, target: str) -> Claim:
    """results/README.md's sentence on a dataset chapter's FFDNet rows: FFDNet minus the set's DDPM in front of
    ResUNet++, certified ``target`` Dice (mean [interval]) and abstention (the mean alone, without its +) per sigma."""
    return Claim(RESULTS, f"same ResUNet++ on the {images} test images, FFDNet minus the set's DDPM in certified {target} "
                          "Dice is {} / {} / {} at sigma 0.25 / 0.5 / 1.0, and it abstains on {} / {} / {} more points",
                 notebook, (*(ffdnet_difference(sigma) for sigma in SIGMAS),
                            *(calc_from(ffdnet_difference(sigma, 4, spec=None), lambda text: text.split()[0].lstrip("+"))
                              for sigma in SIGMAS)))


MONTGOMERY_256 = "book/montgomery_256.ipynb"
MONTGOMERY_256_SEGMENTERS = "results/montgomery_256_segmenters_val.json"


def montgomery_256_claims() -> list[Claim]:
    """The Montgomery at 256 px section of results/README.md: the chapter's tables (the paper's UNet column of
    Table 1 beside ours), the plain Dice, the segmenters' validation Dice and the chapter's cost."""
    def val_dice(noise: float, key: str, spec: str) -> Value:
        return at("segmenters", {"arch": "unet", "noise_sigma": noise}, key, spec=spec)

    return [
        *dataset_chapter_claims(MONTGOMERY_256, {"unet": ("0.93", "0.89", "0.88")}, archs=("unet",)),
        Claim(RESULTS, "Plain lung Dice on the clean test images: UNet {} (trained without noise), {} (with sigma 0.25",
              MONTGOMERY_256, tuple(cell(method, "unet", column=4, code="paper_table(comparison)")
                                    for method in ("plain (noise 0)", "plain (noise 0.25)"))),
        Claim(RESULTS, "Dice {} at epoch {}, patience stopping it at {}; noise-trained {} at epoch {} of {}",
              MONTGOMERY_256_SEGMENTERS, (val_dice(0.0, "best_val_dice", ".3f"), val_dice(0.0, "best_epoch", "d"),
                                          val_dice(0.0, "epochs", "d"), val_dice(0.25, "best_val_dice", ".3f"),
                                          val_dice(0.25, "best_epoch", "d"), val_dice(0.25, "epochs", "d"))),
        Claim(RESULTS, "the chapter's runs took {} s of a 2-core CPU, training included (the DDPM, both UNets",
              "results/montgomery_256_chapter_cost.json", (at("total_seconds", spec=",.0f"),)),
        Claim(RESULTS, "({} / {} / {} against Table 1's 0.93 / 0.89 / 0.88)", MONTGOMERY_256,
              tuple(cell(OURS, "unet", sigma, column=4, code="paper_table(per_arch)") for sigma in SIGMAS)),
        Claim("book/intro.md", "at the shared copy's 256 px, UNet certifies {} / {} / {} against the paper's UNet 0.93 / "
                               "0.89 / 0.88, ahead of SegCertify at σ = 0.5 and 1.0 and behind it by {} at 0.25", MONTGOMERY_256,
              (*(cell(OURS, "unet", sigma, column=4, code="paper_table(per_arch)") for sigma in SIGMAS),
               against_segcertify("unet", "0.25", transform=lambda text: text.split()[0].lstrip(MINUS)))),
        Claim(RESULTS, "as at 128 px ({} / {} / {} there, the Montgomery chapter above)", MONTGOMERY,
              tuple(cell(OURS, "unet", sigma, column=4, code="paper_table(per_arch)") for sigma in SIGMAS)),
        Claim(RESULTS, "(by {}, the interval excluding 0, while ours abstains on {} point less of the image), **far "
                       "behind at 0.5** ({}:", MONTGOMERY_256,
              (against_segcertify("unet", "0.25", transform=lambda text: text.split()[0].lstrip(MINUS)),
               against_segcertify("unet", "0.25", 4, lambda text: text.split()[0].lstrip(MINUS)),
               cell(SEGCERTIFY, "unet", "0.50", column=4, code="paper_table(comparison)"))),
        Claim(RESULTS, "abstains less than ours ({} points). At 128 px SegCertify kept {} at sigma 0.5 with ResUNet++",
              MONTGOMERY_256, (against_segcertify("unet", "1.00", 4, lambda text: text.split()[0]),
                               elsewhere(cell(SEGCERTIFY, "resunetpp", "0.50", column=4, code="paper_table(comparison)"), MONTGOMERY))),
    ]


def best_epoch(choose: Callable[..., int]) -> Value:
    """``choose`` (min or max) of the best epochs of a segmenters' validation JSON (scripts/segmenter_history.py)."""
    return calc(lambda data: choose(item["best_epoch"] for item in data["segmenters"]), "d")


SHENZHEN_BEFORE = "b73656d:book/shenzhen.ipynb"
SHENZHEN_SEGMENTERS = "results/shenzhen_segmenters_val.json"


def shenzhen_claims() -> list[Claim]:
    """The Shenzhen section of results/README.md: the chapter's tables (the paper's Table 1 beside the three
    architectures), the segmenters' validation Dice, the cost, SegCertify's abstention, FFDNet's rows and the
    chapter's previous execution (commit b73656d) beside this one."""
    def val_dice(arch: str, noise: float) -> Value:
        return at("segmenters", {"arch": arch, "noise_sigma": noise}, "best_val_dice", spec=".3f")

    segcertify_1 = cell(SEGCERTIFY, "resunetpp", "1.00", column=4, code="paper_table(comparison)")
    return [
        *dataset_chapter_claims(SHENZHEN, {"resunetpp": ("0.95", "0.93", "0.90"), "unet": ("0.95", "0.93", "0.89"),
                                           "deeplabv2": ("0.80", "0.34", "0.04")}),
        Claim(RESULTS, "best validation Dice ResUNet++ {}, UNet {}, DeepLabV2 {}, noise-trained ResUNet++ {}, best at "
                       "epochs {} to {}", SHENZHEN_SEGMENTERS,
              (val_dice("resunetpp", 0.0), val_dice("unet", 0.0), val_dice("deeplabv2", 0.0),
               val_dice("resunetpp", 0.25), best_epoch(min), best_epoch(max))),
        Claim(RESULTS, "the chapter's runs took {} s of a 2-core CPU, training included (`shenzhen_chapter_cost.json`)",
              "results/shenzhen_chapter_cost.json", (at("total_seconds", spec=",.0f"),)),
        Claim(RESULTS, "Plain lung Dice on the clean test images: ResUNet++ {} (trained without noise), {} (with "
                       "sigma 0.25 noise). Paired differences over the 40 images", SHENZHEN,
              tuple(cell(method, "resunetpp", column=4, code="paper_table(comparison)")
                    for method in ("plain (noise 0)", "plain (noise 0.25)"))),
        Claim(RESULTS, "matches the paper**: {} / {} / {} against its 0.95 / 0.93 / 0.90", SHENZHEN, ours_dice("resunetpp")),
        Claim(RESULTS, "ahead at 0.5 by less than 0.01 ({}, the interval's lower end just above 0), tied at 0.25 and "
                       "tied at 1.0 ({})", SHENZHEN, (against_segcertify("resunetpp", "0.50"),
                                                     against_segcertify("resunetpp", "1.00"))),
        Claim(RESULTS, "intervals excluding 0: {}, {} and {} points of the image", SHENZHEN,
              tuple(unsigned_mean(against_segcertify("resunetpp", sigma, 4)) for sigma in SIGMAS)),
        Claim(RESULTS, "abstaining on {} % of the image but only {} % of the lung pixels, so mostly on background, "
                       "against {} % of the image for ours", SHENZHEN,
              (cell(SEGCERTIFY, "resunetpp", "1.00", column=7, spec=".1f", code="paper_table(comparison)"),
               cell(SEGCERTIFY, "resunetpp", "1.00", column=6, spec=".1f", code="paper_table(comparison)"),
               cell(OURS, "resunetpp", "1.00", column=7, spec=".1f", code="paper_table(comparison)"))),
        Claim(RESULTS, "certified SegCertify at {} at sigma 1.0, and ours ahead by {}; this training of its "
                       "noise-trained segmenter certifies {}", SHENZHEN_BEFORE,
              (segcertify_1, against_segcertify("resunetpp", "1.00"), elsewhere(segcertify_1, SHENZHEN))),
        Claim(RESULTS, "Ours moved by at most 0.01 ({} / {} / {} before)", SHENZHEN_BEFORE, ours_dice("resunetpp")),
        Claim(RESULTS, "DeepLabV2 certifies {} / {} / {} here", SHENZHEN, ours_dice("deeplabv2")),
        ffdnet_against_ddpm(SHENZHEN, 40, "lung"),
        Claim("book/intro.md", "and on Shenzhen's 40 by {} / {} / {} (each interval below 0", SHENZHEN,
              tuple(unsigned_mean(ffdnet_difference(sigma)) for sigma in SIGMAS)),
        Claim("book/intro.md", "it abstains less at every σ (by {} points of the image at 1.0), and the previous training "
                               "of the same settings had SegCertify at {} at σ = 1.0 where this one has {}", SHENZHEN,
              (unsigned_mean(against_segcertify("resunetpp", "1.00", 4)), elsewhere(segcertify_1, SHENZHEN_BEFORE),
               segcertify_1)),
        Claim(RESULTS, "further behind than on Montgomery ({} / {} / {})", MONTGOMERY,
              tuple(unsigned_mean(ffdnet_difference(sigma)) for sigma in SIGMAS)),
    ]


MONTGOMERY_SEEDS = "book/montgomery_seeds.ipynb"


def seed_rows(notebook: str, rows: tuple[tuple[str, str, str], ...] = (("ours", OURS, "resunetpp"),
                                                                        ("SegCertify", SEGCERTIFY, "resunetpp"))
              ) -> list[Claim]:
    """A seeds chapter's per-seed table in results/README.md: each (label, method, arch) row at each sigma, the
    certified Dice of the chapter's one class per training seed, their mean and sd (its seeds_table)."""
    return [Claim(RESULTS, f"| {label} | {shown} | {{}} | {{}} | {{}} | {{}} | {{}} |", notebook,
                  tuple(cell(method, arch, sigma, column=column, code="seeds_table") for column in range(4, 9)))
            for label, method, arch in rows for sigma, shown in zip(SIGMAS, ("0.25", "0.5", "1.0"))]


def montgomery_seeds_claims() -> list[Claim]:
    """The Montgomery over three training seeds section of results/README.md: the chapter's tables (means over
    seeds and images, ours minus SegCertify with its two-level interval and seed spread) and the per-seed
    certified lung Dice of ours and SegCertify."""
    return [
        *dataset_chapter_claims(MONTGOMERY_SEEDS, {"resunetpp": ("0.96", "0.94", "0.89")}, archs=("resunetpp",)),
        *seed_rows(MONTGOMERY_SEEDS),
        Claim(RESULTS, "runs of this chapter took {} s of a 2-core CPU, training included",
              "results/montgomery_seeds_chapter_cost.json", (at("total_seconds", spec=",.0f"),)),
        Claim(RESULTS, "Certified lung Dice per training seed (mean over the {} images)", MONTGOMERY_SEEDS,
              (calc_from(cell("test images", column=1, code="settings_table"), lambda text: text.split()[0]),)),
        Claim(RESULTS, "**Ours does not move between trainings**: {} / {} / {} at every seed, the single-training "
                       "chapter's numbers", MONTGOMERY,
              ours_dice()),
        Claim(RESULTS, "**SegCertify at sigma 1.0 depends on its training**: {} / {} / {} certified lung Dice",
              MONTGOMERY_SEEDS, tuple(cell(SEGCERTIFY, "resunetpp", "1.00", column=column, code="seeds_table")
                                      for column in (4, 5, 6))),
        Claim(RESULTS, "The single-training chapter's {} lead of ours at sigma 1.0", MONTGOMERY,
              (against_segcertify("resunetpp", "1.00", transform=lambda text: text.split()[0]),)),
        Claim(RESULTS, "over three seeds ours is ahead by {}, the interval [{}, {}] excluding 0. At sigma 0.5 ours is "
                       "ahead at every seed ({}, interval", MONTGOMERY_SEEDS,
              (*(against_segcertify("resunetpp", "1.00", transform=lambda text, index=index: interval_part(text, index))
                 for index in (0, 1, 2)),
               against_segcertify("resunetpp", "0.50", transform=lambda text: text.split()[0]))),
        Claim(RESULTS, "ahead at sigma 0.25 by {}; over three seeds the difference is {}, a tie", MONTGOMERY,
              (against_segcertify("resunetpp", "0.25", transform=lambda text: text.rsplit(" sd", 1)[0]),
               elsewhere(against_segcertify("resunetpp", "0.25", transform=lambda text: text.rsplit(" sd", 1)[0]), MONTGOMERY_SEEDS))),
        Claim(RESULTS, "(ours still abstains on {} points less of the image). Its abstention difference at sigma 1.0 "
                       "({} points, SegCertify", MONTGOMERY_SEEDS,
              (against_segcertify("resunetpp", "0.25", 4, lambda text: text.split()[0].lstrip(MINUS)),
               elsewhere(against_segcertify("resunetpp", "1.00", 4, lambda text: text.split()[0]), MONTGOMERY))),
        Claim("book/intro.md", "ours certifies {} / {} / {} at every seed and stays ahead of SegCertify at σ = 0.5 and 1.0 "
                               "({} and {}, the interval", MONTGOMERY_SEEDS,
              (*ours_dice(),
               *(against_segcertify("resunetpp", sigma, transform=lambda text: text.split()[0]) for sigma in SIGMAS[1:]))),
        Claim("book/intro.md", "certified Dice at σ = 1.0 moves between {} and {} from one training", MONTGOMERY_SEEDS,
              (cell(SEGCERTIFY, "resunetpp", "1.00", column=4, code="seeds_table"),
               cell(SEGCERTIFY, "resunetpp", "1.00", column=5, code="seeds_table"))),
        Claim(RESULTS, "background) becomes {}: no direction", MONTGOMERY_SEEDS,
              (against_segcertify("resunetpp", "1.00", 4, lambda text: text.rsplit(" sd", 1)[0]),)),
    ]


def added_seeds_cost(cost: str) -> Claim:
    """A seeds section's cost sentence: how many runs seeds 1 and 2 added to the chapter and their seconds."""
    def added(data: Any) -> list[dict[str, Any]]:
        return [run for run in data["runs"] if run["training_seed"] in (1, 2)]

    return Claim(RESULTS, "the {} runs of seeds 1 and 2 took {} s on the 2-core Intel Xeon", cost,
                 (calc(lambda data: len(added(data)), spec="d"),
                  calc(lambda data: sum(run["seconds"] for run in added(data)), spec=",.0f")))


def seed_val_dice(model: str) -> tuple[Value, ...]:
    """A segmenter's best validation Dice (three decimals) for training seeds 0, 1 and 2, from a segmenters JSON;
    ``model`` is the seed-0 file name."""
    return tuple(at("segmenters", {"model": model.replace("seed0", f"seed{seed}")}, "best_val_dice", spec=".3f")
                 for seed in (0, 1, 2))


def largest_seed_sd(method: str, arch: str = "resunetpp") -> Value:
    """The largest sd over training seeds, over the sigmas, of a seeds chapter's ``method`` row, as printed."""
    return lambda data: frozenset([max((next(iter(cell(method, arch, sigma, column=8, code="seeds_table")(data)))
                                        for sigma in SIGMAS), key=float)])


def retrained_seeds_claims(val: str, model: str, chapter_segmenters: str, cost: str, target: str) -> list[Claim]:
    """A seeds section whose three seeds were all trained here (the chapter's own models were trained on another
    CPU): ResUNet++'s best validation ``target`` Dice per seed without and with noise 0.25 (``model``: seed 0's
    file without noise, in ``val``), the chapter's own two from ``chapter_segmenters``, and from ``cost`` the runs'
    seconds and the warm-up that trained the nine models."""
    return [
        Claim(RESULTS, f"Best validation {target} Dice of ResUNet++ per seed: {{}} / {{}} / {{}} without noise, "
                       "{} / {} / {} trained with noise 0.25", val,
              (*seed_val_dice(model), *seed_val_dice(model.replace("noise0.0", "noise0.25")))),
        Claim(RESULTS, "the chapter's own, trained on another CPU, had {} and {})", chapter_segmenters,
              tuple(at("segmenters", {"arch": "resunetpp", "noise_sigma": noise}, "best_val_dice", spec=".3f")
                    for noise in (0.0, 0.25))),
        Claim(RESULTS, "the {} runs of the three seeds took {} s on the 2-core Intel Xeon", cost,
              (calc(lambda data: len(data["runs"]), spec="d"), at("total_seconds", spec=",.0f"))),
        Claim(RESULTS, "their nine models (three DDPMs, six ResUNet++) were trained before, in two one-thread "
                       "processes, in {} s of wall time", cost, (at("warm_up", "wall_seconds", spec=",.0f"),)),
    ]


CXR_SEEDS, CXR_SEEDS_COST = "book/cxr_lungs_seeds.ipynb", "results/cxr_lungs_seeds_chapter_cost.json"
CXR_SEEDS_VAL = "results/cxr_lungs_seeds_segmenters_val.json"


def cxr_seeds_claims() -> list[Claim]:
    """The paediatric chest X-rays over three training seeds section of results/README.md and its sentence in
    the introduction: the chapter's tables (means over seeds and images, ours minus SegCertify with its
    two-level interval and seed spread), the per-seed certified lung Dice, the segmenters' validation Dice per
    seed and the cost of the seeds the chapter added."""
    def val_dice(noise: str) -> tuple[Value, ...]:
        return seed_val_dice(f"folder_128_resunetpp_matched_e11_noise{noise}_p8_bf16_seed0_data948d4695474a.pt")

    return [
        *dataset_chapter_claims(CXR_SEEDS, {}, archs=("resunetpp",)),
        *seed_rows(CXR_SEEDS),
        Claim(RESULTS, "Best validation lung Dice of ResUNet++ per seed: {} / {} / {} without noise, {} / {} / {} "
                       "trained with noise 0.25", CXR_SEEDS_VAL, (*val_dice("0.0"), *val_dice("0.25"))),
        added_seeds_cost(CXR_SEEDS_COST),
        Claim(RESULTS, "in two one-thread processes, in {} s of wall time", CXR_SEEDS_COST,
              (at("warm_up", "wall_seconds", spec=",.0f"),)),
        Claim(RESULTS, "Ours is ahead of SegCertify at sigma 0.5 ({}, [{}, {}]) and 1.0 ({}, [{}, {}]), and at sigma "
                       "0.25 SegCertify stays ahead by less than 0.01 ({}, the interval's upper end below 0)", CXR_SEEDS,
              (*(against_segcertify("resunetpp", sigma, transform=lambda text, index=index: interval_part(text, index))
                 for sigma in SIGMAS[1:] for index in (0, 1, 2)),
               against_segcertify("resunetpp", "0.25", transform=lambda text: text.rsplit(" sd", 1)[0]))),
        Claim(RESULTS, "**Ours does not move between trainings**: {} / {} / {} (sd over seeds {} at every sigma), "
                       "while SegCertify's sigma 0.5 moves from {} and {} to {} with its third training", CXR_SEEDS,
              (*ours_dice(),
               lambda data: frozenset().union(*(cell(OURS, "resunetpp", sigma, column=8, code="seeds_table")(data)
                                                for sigma in SIGMAS)),
               *(cell(SEGCERTIFY, "resunetpp", "0.50", column=column, code="seeds_table") for column in (4, 5, 6)))),
        Claim("book/intro.md", "over three training seeds of every model too, {}, `cxr_lungs_seeds.ipynb`", CXR_SEEDS,
              (against_segcertify("resunetpp", "0.25", transform=lambda text: text.rsplit(" sd", 1)[0]),)),
    ]


CVC_SEEDS, CVC_SEEDS_COST = "book/cvc_clinicdb_seeds.ipynb", "results/cvc_clinicdb_seeds_chapter_cost.json"


def cvc_seeds_claims() -> list[Claim]:
    """The CVC-ClinicDB over three training seeds section of results/README.md and its sentences in the
    introduction: the chapter's tables (means over seeds and frames, ours minus SegCertify and each architecture
    minus ResUNet++ with their two-level intervals and seed spread), the per-seed certified polyp Dice, the
    segmenters' validation Dice per seed and the cost of the seeds the chapter added."""
    others = ("unet", "deeplabv2")

    def val_dice(arch: str, noise: str) -> tuple[Value, ...]:
        return seed_val_dice(cvc_model(arch, noise)["model"])

    def against_resunetpp(data: Any) -> list[float]:
        return [printed_number(interval, data) for interval in
                (cell(arch, OURS, sigma, column=3, spec="minus", code="architectures_against_first")
                 for arch in others for sigma in SIGMAS)]

    return [
        *dataset_chapter_claims(CVC_SEEDS, {}, target="polyp", archs=("resunetpp", *others)),
        *seed_rows(CVC_SEEDS, (("ours", OURS, "resunetpp"), ("SegCertify", SEGCERTIFY, "resunetpp"),
                               ("ours, UNet", OURS, "unet"), ("ours, DeepLabV2", OURS, "deeplabv2"))),
        Claim(RESULTS, "ResUNet++ {} / {} / {} without noise, {} / {} / {} trained with noise 0.25; UNet {} / {} / {}; "
                       "DeepLabV2 {} / {} / {}", CVC_VAL,
              (*val_dice("resunetpp", "0.0"), *val_dice("resunetpp", "0.25"), *val_dice("unet", "0.0"),
               *val_dice("deeplabv2", "0.0"))),
        Claim(RESULTS, "UNet and DeepLabV2 certify more polyp than ResUNet++ at every sigma, by {} to {}, every "
                       "interval excluding 0", CVC_SEEDS,
              (calc(lambda data: min(against_resunetpp(data))), calc(lambda data: max(against_resunetpp(data))))),
        Claim(RESULTS, "With ours, UNet certifies {} / {} / {} and DeepLabV2 {} / {} / {} at sigma 0.25 / 0.5 / 1.0: "
                       "the paper's 0.45 is passed at sigma 0.25 by both, and by every seed of each ({} / {} / {} and "
                       "{} / {} / {})", CVC_SEEDS,
              (*ours_dice("unet"), *ours_dice("deeplabv2"),
               *(cell(OURS, arch, "0.25", column=column, code="seeds_table") for arch in others for column in (4, 5, 6)))),
        Claim("book/intro.md", "UNet certifies {} / {} / {} and DeepLabV2 {} / {} / {}, so the paper's 0.45 is passed at "
                               "σ = 0.25 by the other two architectures", CVC_SEEDS, (*ours_dice("unet"), *ours_dice("deeplabv2"))),
        Claim("book/intro.md", "DeepLabV2 − ResUNet++ {}, {}, {} and UNet − ResUNet++ {}, {}, {} at σ = 0.25 / 0.5 / 1.0 "
                               "(`cvc_clinicdb_seeds.ipynb`", CVC_SEEDS,
              tuple(calc_from(cell(arch, OURS, sigma, column=3, spec="minus", code="architectures_against_first"),
                              lambda text: text.rsplit(" sd", 1)[0]) for arch in reversed(others) for sigma in SIGMAS)),
        Claim(RESULTS, "That chapter had ours ahead of SegCertify at every sigma ({}, {}, {}, intervals excluding 0); "
                       "over three seeds ours − SegCertify is {}, {} and {} polyp Dice", CVC,
              (*(against_segcertify("resunetpp", sigma, transform=lambda text: text.split()[0]) for sigma in SIGMAS),
               *(elsewhere(against_segcertify("resunetpp", sigma, transform=lambda text: text.split()[0]), CVC_SEEDS)
                 for sigma in SIGMAS))),
        Claim(RESULTS, "Seed 0 was SegCertify's weakest training ({} / {} / {} at sigma 0.25 / 0.5 / 1.0, against "
                       "{} / {} / {} and {} / {} / {} from seeds 1 and 2) and ours' strongest ({} / {} / {}, against "
                       "{} / {} / {} and {} / {} / {})", CVC_SEEDS,
              tuple(cell(method, "resunetpp", sigma, column=column, code="seeds_table")
                    for method in (SEGCERTIFY, OURS) for column in (4, 5, 6) for sigma in SIGMAS)),
        Claim(RESULTS, "**Ours abstains less** at sigma 0.25 ({} points less of the frame, [{}, {}]) and 0.5 ({} "
                       "points, [{}, {}])", CVC_SEEDS,
              tuple(against_segcertify("resunetpp", sigma, 4, lambda text, index=index: interval_part(text, index).lstrip(
                  MINUS) if index == 0 else interval_part(text, index)) for sigma in SIGMAS[:2] for index in (0, 1, 2))),
        Claim(RESULTS, "plain polyp Dice on the 40 clean frames {} / {} / {} for seeds 0 / 1 / 2; ours certifies "
                       "{} / {} / {} over the seeds", CVC_SEEDS,
              (*(cell("plain (noise 0)", "resunetpp", "0.00", column=column, code="seeds_table") for column in (4, 5, 6)),
               *ours_dice())),
        Claim(RESULTS, "(sd over seeds up to {} for ours and {} for SegCertify)", CVC_SEEDS,
              (largest_seed_sd(OURS), largest_seed_sd(SEGCERTIFY))),
        added_seeds_cost(CVC_SEEDS_COST),
        Claim(RESULTS, "before, in two one-thread processes, in {} s of wall time", CVC_SEEDS_COST,
              (at("warm_up", "wall_seconds", spec=",.0f"),)),
        Claim("book/intro.md", "ours with ResUNet++ certifies {} / {} / {} and ours − SegCertify is {}, {} and {} at "
                               "σ = 0.25 / 0.5 / 1.0, no direction", CVC_SEEDS,
              (*ours_dice(),
               *(against_segcertify("resunetpp", sigma, transform=lambda text: text.rsplit(" sd", 1)[0])
                 for sigma in SIGMAS))),
    ]


ISIC, ISIC_GATE = "book/isic2017.ipynb", "results/isic2017_denoiser_gate_val.json"
ISIC_SEGMENTERS, ISIC_COST = "results/isic2017_segmenters_val.json", "results/isic2017_chapter_cost.json"


def isic_claims() -> list[Claim]:
    """The ISIC 2017 section of results/README.md and its sentences in the introduction: the chapter's tables
    (the paper's Table 3 beside ResUNet++ and SegCertify), FFDNet against the set's DDPM on the test images and
    in the gate, the segmenters' validation Dice and the chapter's cost."""
    def val_dice(arch: str, noise: float) -> Value:
        return at("segmenters", {"arch": arch, "noise_sigma": noise}, "best_val_dice", spec=".3f")

    def gate(sigma: float, key: str, spec: str) -> Value:
        return calc(lambda data: get(data, ("paired_against_single_step", {"sigma": sigma, "denoiser": FFDNET_BOX},
                                            key)), spec)

    ours = list(ours_dice())
    return [
        *dataset_chapter_claims(ISIC, {"resunetpp": ("0.85", "0.83", "0.77")}, "lesion", ("0.79", "0.41", "0.00")),
        Claim(RESULTS, "Plain lesion Dice on the clean test images: ResUNet++ {} (trained without noise), {} (with "
                       "sigma 0.25 noise)", ISIC,
              tuple(cell(method, "resunetpp", column=4, code="paper_table(comparison)")
                    for method in ("plain (noise 0)", "plain (noise 0.25)"))),
        ffdnet_against_ddpm(ISIC, 40, "lesion"),
        Claim(RESULTS, "ties it at sigma 0.25 ({} dB [{}, {}]) and trails by {} and {} dB at 0.5 and 1.0", ISIC_GATE,
              (*(gate(0.25, key, "signed2") for key in ("mean_db", "low_db", "high_db")),
               pair_of(0.5, FFDNET_BOX, "mean_db", sign=-1), pair_of(1.0, FFDNET_BOX, "mean_db", sign=-1))),
        Claim("book/intro.md", "validation PSNR at σ = 0.25 ({} dB [{}, {}])", ISIC_GATE,
              tuple(gate(0.25, key, "signed2") for key in ("mean_db", "low_db", "high_db"))),
        Claim("book/intro.md", "it certifies less lesion than the DDPM at every σ, by little: {} / {} / {}", ISIC,
              tuple(calc_from(ffdnet_difference(sigma), lambda text: text.split()[0].lstrip(MINUS)) for sigma in SIGMAS)),
        Claim(RESULTS, "best validation Dice ResUNet++ {}, UNet {}, DeepLabV2 {}, noise-trained ResUNet++ {}, each at "
                       "its last epoch", ISIC_SEGMENTERS,
              (val_dice("resunetpp", 0.0), val_dice("unet", 0.0), val_dice("deeplabv2", 0.0), val_dice("resunetpp", 0.25))),
        Claim(RESULTS, "chapter's runs took {} s of a 2-core CPU, training included", ISIC_COST,
              (at("total_seconds", spec=",.0f"),)),
        Claim("book/intro.md", "ResUNet++ certifies lesion Dice {} / {} / {} on 40 test images", ISIC, tuple(ours)),
        Claim("book/intro.md", "ahead of SegCertify at σ = 0.5 and 1.0 ({} and {}, the paired interval", ISIC,
              tuple(calc_from(cell("resunetpp", OURS, sigma, column=3, spec="minus", code="ours_against_segcertify"),
                              lambda text: text.split()[0]) for sigma in SIGMAS[1:])),
    ]


ISIC_SEEDS, ISIC_SEEDS_COST = "book/isic2017_seeds.ipynb", "results/isic2017_seeds_chapter_cost.json"
ISIC_SEEDS_VAL = "results/isic2017_seeds_segmenters_val.json"


def isic_seeds_claims() -> list[Claim]:
    """The ISIC 2017 over three training seeds section of results/README.md and its sentence in the
    introduction: the chapter's tables (means over seeds and images beside the paper's Table 3, ours minus
    SegCertify with its two-level interval and seed spread), the per-seed certified lesion Dice, the
    segmenters' validation Dice per seed and the cost of the seeds the chapter added."""
    model = "isic2017_128_resunetpp_matched_e4_noise0.0_p8_flips_bf16_seed0_datac455ee7b4247.pt"
    ours = ours_dice()
    return [
        *dataset_chapter_claims(ISIC_SEEDS, {"resunetpp": ("0.85", "0.83", "0.77")}, "lesion", ("0.79", "0.41", "0.00"),
                                archs=("resunetpp",)),
        *seed_rows(ISIC_SEEDS),
        *retrained_seeds_claims(ISIC_SEEDS_VAL, model, ISIC_SEGMENTERS, ISIC_SEEDS_COST, "lesion"),
        Claim(RESULTS, "**Ours hardly moves between trainings**: {} / {} / {} over three seeds (sd at most {})",
              ISIC_SEEDS, (*ours, largest_seed_sd(OURS))),
        Claim(RESULTS, "even with seed 2's segmenter at {} validation Dice", ISIC_SEEDS_VAL, (seed_val_dice(model)[2],)),
        Claim(RESULTS, "at sigma 0.5 it certifies {} / {} / {} lesion Dice from three trainings of the same settings, "
                       "at sigma 1.0 {} / {} / {}", ISIC_SEEDS,
              tuple(cell(SEGCERTIFY, "resunetpp", sigma, column=column, code="seeds_table")
                    for sigma in SIGMAS[1:] for column in (4, 5, 6))),
        Claim(RESULTS, "The single-training chapter's {} and {} were single draws", ISIC,
              tuple(cell(SEGCERTIFY, "resunetpp", sigma, column=4, code="paper_table(comparison)")
                    for sigma in SIGMAS[1:])),
        Claim(RESULTS, "ours is ahead at sigma 0.5 by {} [{}, {}] and at 1.0 by {} [{}, {}], the intervals excluding 0 "
                       "but wide; at sigma 0.25 the two tie ({}), as in the chapter, and ours abstains on {} points less",
              ISIC_SEEDS,
              (*(against_segcertify("resunetpp", sigma, transform=lambda text, index=index: interval_part(text, index))
                 for sigma in SIGMAS[1:] for index in (0, 1, 2)),
               against_segcertify("resunetpp", "0.25", transform=lambda text: text.rsplit(" sd", 1)[0]),
               against_segcertify("resunetpp", "0.25", 4, lambda text: text.split()[0].lstrip(MINUS)))),
        Claim(RESULTS, "**Abstention has no direction at sigma 0.5 and 1.0** ({} and {}", ISIC_SEEDS,
              tuple(against_segcertify("resunetpp", sigma, 4, lambda text: text.rsplit(" sd", 1)[0])
                    for sigma in SIGMAS[1:])),
        Claim(RESULTS, "instead of abstaining ({} lesion Dice at sigma 1.0 with {} % of the image abstained)", ISIC_SEEDS,
              (cell(SEGCERTIFY, "resunetpp", "1.00", column=4, code="paper_table(comparison)"),
               cell(SEGCERTIFY, "resunetpp", "1.00", column=7, spec=".1f", code="paper_table(comparison)"))),
        Claim("book/intro.md", "ours certifies {} / {} / {} and stays ahead of SegCertify at σ = 0.5 and 1.0 ({} and {}, "
                               "the interval over seeds and images excluding 0), while SegCertify's certified lesion Dice "
                               "at σ = 0.5 moves between {} and {}", ISIC_SEEDS,
              (*ours, *(against_segcertify("resunetpp", sigma, transform=lambda text: text.split()[0])
                        for sigma in SIGMAS[1:]),
               cell(SEGCERTIFY, "resunetpp", "0.50", column=5, code="seeds_table"),
               cell(SEGCERTIFY, "resunetpp", "0.50", column=6, code="seeds_table"))),
    ]


HIPPOCAMPUS, VOLUME_BENCH = "book/hippocampus.ipynb", "benchmarks/results/bench_volume_certify.json"
VOLUME_OURS = "ours (unet)"


def hippocampus_claims() -> list[Claim]:
    """The hippocampus section of results/README.md: certified anterior / posterior Dice and whole-volume abstention
    per model and sigma, the plain Dice, the paired differences, the validation Dice and the benchmark's seconds."""
    def row(label: str, method: str, arch: str, code: str) -> Claim:
        return Claim(RESULTS, f"| {label} | {{}} / {{}}, {{}} % | {{}} / {{}}, {{}} % | {{}} / {{}}, {{}} % |", HIPPOCAMPUS,
                     tuple(cell(method, arch, sigma, column=column, code=code)
                           for sigma in SIGMAS for column in (4, 7, 10)))

    def differences(label: str, arch: str, column: int, code: str) -> Claim:
        return Claim(RESULTS, f"| {label} | {{}} | {{}} | {{}} |", HIPPOCAMPUS,
                     tuple(cell(arch, VOLUME_OURS, sigma, column=column, spec="minus", code=code) for sigma in SIGMAS))

    bench = lambda arch, method: at("rows", {"architecture": arch, "method": method}, "seconds per volume (median)")
    step = lambda network: at("training_rows", {"network": network}, "seconds per step of 16 volumes")
    best = lambda arch, noise: at("segmenters", {"arch": arch, "noise_sigma": noise}, "best_val_dice", spec=".3f")
    plain = lambda noise, column: cell(f"plain (noise {noise})", "unet3d", "0.00", column=column,
                                       code="paper_table(comparison)")
    return [
        row("ours, 3D U-Net", VOLUME_OURS, "unet3d", "paper_table(per_arch)"),
        row("ours, 2D U-Net slice by slice", VOLUME_OURS, "unet-slicewise", "paper_table(per_arch)"),
        row("SegCertify, 3D U-Net", "SegCertify", "unet3d", "paper_table(comparison)"),
        differences("ours − SegCertify, 3D U-Net, anterior", "unet3d", 3, "ours_against_segcertify"),
        differences("the same, posterior", "unet3d", 4, "ours_against_segcertify"),
        differences("slice by slice − 3D U-Net (ours), anterior", "unet-slicewise", 3, "architectures_against_first"),
        differences("the same, posterior", "unet-slicewise", 4, "architectures_against_first"),
        Claim(RESULTS, "Plain Dice on the clean test volumes, 3D U-Net: {} / {} (trained without noise), {} / {}",
              HIPPOCAMPUS, (plain("0", 4), plain("0", 7), plain("0.25", 4), plain("0.25", 7))),
        Claim(RESULTS, "takes {} s per volume for SegCertify's 3D U-Net, {} s for ours with the 3D U-Net and {} s with "
                       "the 2D U-Net slice by slice", VOLUME_BENCH,
              (bench("unet3d", "SegCertify"), bench("unet3d", VOLUME_OURS), bench("unet-slicewise", VOLUME_OURS))),
        Claim(RESULTS, "a training step of the tiny 3D DDPM costs {} s against {} s for the UNet denoiser", VOLUME_BENCH,
              (step("3D DDPM, tiny preset (noise prediction)"), step("3D UNet denoiser, the chapter's widths"))),
        Claim(RESULTS, "validation Dice: 3D U-Net {}, the 2D U-Net slice by slice {}, the noise-trained 3D U-Net {}",
              "results/hippocampus_segmenters_val.json",
              (best("unet3d", 0.0), best("unet-slicewise", 0.0), best("unet3d", 0.25))),
    ]


def calc_from(value: Value, transform: Callable[[str], str]) -> Value:
    """``value``'s printed texts, each transformed (e.g. the mean alone of "+1.9 [+1.8, +2.2]")."""
    return lambda data: frozenset(transform(text) for text in value(data))


def pair_of(sigma: float, denoiser: str, key: str, sign: int = 1) -> Value:
    """A gate JSON's paired PSNR difference (``denoiser`` minus single-step) at ``sigma``, times ``sign``."""
    return calc(lambda data: sign * get(data, ("paired_against_single_step", {"sigma": sigma, "denoiser": denoiser}, key)))
README = "README.md"
ATTACK, SEQUENTIAL = "results/attack.json", "results/jsrt_sequential.json"
BENCH_CERTIFY = "benchmarks/results/bench_certify.json"
QUICK, PAPER_SMALL = "benchmarks/results/bench_pipeline_quick_cpu.json", "benchmarks/results/bench_pipeline_paper-small_cpu.json"
SHARED, CHAPTER_SHARED = "benchmarks/results/bench_shared_draws_cpu.json", "benchmarks/results/bench_chapter_shared_cpu.json"
GRID_COST, MAIN_JOB = "benchmarks/results/paper_grid_cost.json", "benchmarks/results/main_job_timing.json"
FP32_MAIN_JOB = "bac0672:benchmarks/results/main_job_timing.json"  # the main job before bf16, as committed then
NO_BF16_MAIN_JOB = "benchmarks/results/main_job_timing_without_bf16.json"  # the main job on a CPU without native bf16


def minutes_and_seconds(data: Any) -> frozenset[str]:
    """A main-job JSON's total as ``12 min 46 s``."""
    total = int(round(data["seconds"]["total"]))
    return frozenset([f"{total // 60} min {total % 60} s"])


def cpu_without_bf16(data: Any) -> frozenset[str]:
    """The CPU model a benchmark JSON records, said to lack native bf16 only if its flags are empty."""
    machine = data["machine"]
    assert machine["bf16_flags"] == [], f"{machine['cpu']} has {machine['bf16_flags']}"
    return frozenset([machine["cpu"]])


NO_BF16_BENCH = "benchmarks/results/bench_cpu_precision_without_bf16.json"


def emulated_slowdown(setting: str, pick: Callable[[list[float]], float], spec: str) -> Value:
    """The least or largest factor by which ``setting`` is slower than fp32 over the benchmark's networks."""
    return calc(lambda data: pick([row[setting]["seconds_per_batch"] / row["fp32"]["seconds_per_batch"]
                                   for row in data["throughput"].values()]), spec)


def bf16_without_hardware_claims() -> list[Claim]:
    """The performance chapter's throughput table on a CPU without native bf16 and what it concludes."""
    def row(label: str, network: str) -> Claim:
        return Claim(PERFORMANCE, f"| {label} | {{}} s | {{}}× | {{}}× |", NO_BF16_BENCH,
                     (at("throughput", network, "fp32", "seconds_per_batch", spec=".3f"),
                      *(at("throughput", network, setting, "ratio_to_fp32") for setting in ("bf16", "bf16+cl"))))

    return [
        *(row(label, network) for label, network in (
            ("UNet (tiny)", "unet"), ("ResUNet++ (tiny)", "resunetpp"), ("DeepLabV2 (tiny)", "deeplabv2"),
            ("DDPM (tiny, single step)", "ddpm (64 px, single step)"), ("FFDNet", "ffdnet"),
            ("UNet denoiser", "unet denoiser"))),
        Claim(PERFORMANCE, "on a 2-core {} that has neither flag", NO_BF16_BENCH, (cpu_without_bf16,)),
        Claim(PERFORMANCE, "load average {} before and {} after", NO_BF16_BENCH,
              (at("load_average_before", 0), at("load_average_after", 0))),
        Claim(PERFORMANCE, "emulated: {} to {} times slower than fp32, and {} to {} times slower with channels_last",
              NO_BF16_BENCH, (emulated_slowdown("bf16", min, ".0f"), emulated_slowdown("bf16", max, ".0f"),
                              emulated_slowdown("bf16+cl", min, ".1f"), emulated_slowdown("bf16+cl", max, ".1f"))),
    ]


def main_job_without_bf16_claims() -> list[Claim]:
    """The main job on a CPU without native bf16, in the README and the performance chapter."""
    commit = lambda data: frozenset([data["commit"][:7]])
    day = lambda data: frozenset([data["date"][:10]])
    seconds = lambda *path: at("seconds", *path, spec=".0f")
    trained = lambda index: at("models_trained", index, "seconds", spec=".0f")
    return [
        Claim(README, "the same job takes longer: **{}** on a 2-core {} without AMX or avx512_bf16, from a fresh clone "
                      "on {} at commit {}", NO_BF16_MAIN_JOB, (minutes_and_seconds, cpu_without_bf16, day, commit)),
        Claim(PERFORMANCE, "2-core {} with neither AMX nor avx512_bf16, `auto` resolves to fp32 (the models' names carry no `_bf16`), and on {} at commit "
                           "{}, load average {} at the start, the main job took {}: {} s of install, {} s for the grid "
                           "and {} s for the website. Of the grid, the six models took {} s, two at a time (the DDPM {} s; "
                           "the two segmenters {} and {} s; the three UNet denoisers {}, {} and {} s), and the four "
                           "chapters {}, {}, {} and {} s", NO_BF16_MAIN_JOB,
              (cpu_without_bf16, day, commit, at("load_average_before", 0, spec=".1f"), minutes_and_seconds,
               seconds("install"), seconds("grid"), seconds("website"),
               seconds("of_which_models_trained_before_the_chapters"),
               *(trained(index) for index in range(6)),
               *(at("chapters", index, "seconds", spec=".0f") for index in range(4)))),
        Claim(PERFORMANCE, "its DDPM took {} s where the Xeon's fp32 run (bac0672) took {} s, its segmenters {} and {} s "
                           "against {} and {} s", NO_BF16_MAIN_JOB,
              (trained(0), elsewhere(trained(0), FP32_MAIN_JOB), trained(1), trained(2),
               elsewhere(trained(1), FP32_MAIN_JOB), elsewhere(trained(2), FP32_MAIN_JOB))),
        Claim(REFERENCE, "On a 2-core {} without native bf16, where `auto` is fp32, the same job took {} on {}",
              NO_BF16_MAIN_JOB, (cpu_without_bf16, minutes_and_seconds, day)),
        Claim(PERFORMANCE, "on one without it, plan for about {} the time", NO_BF16_MAIN_JOB,
              (lambda data: frozenset(["twice"] if round(data["seconds"]["total"] / load(MAIN_JOB)["seconds"]["total"]) == 2
                                      else []),)),
    ]
PRESET_CHOICE = "results/preset_choice_jsrt_val.json"
CVC_CHOICE, CVC_VAL = "results/preset_choice_cvc_clinicdb_val.json", "results/cvc_clinicdb_segmenters_val.json"


def cvc_model(arch: str, noise: str = "0.0") -> dict[str, str]:
    """Selects the CVC-ClinicDB chapter's segmenter (blocked split, 20 epochs with flips) in its validation JSON."""
    return {"model": f"cvc_clinicdb_144x192_blocks20_{arch}_matched_e20_noise{noise}_flips_bf16_seed0_data7109ef1fa107.pt"}


def cvc_segmenter(arch: str, noise: str, key: str, spec: str = ".4f") -> Value:
    """A field of that segmenter's record, formatted with ``spec``."""
    return at("segmenters", cvc_model(arch, noise), key, spec=spec)


def cvc_resunetpp_last_five(pick: Callable[[list[float]], float]) -> Value:
    """The least or largest validation Dice of the chapter's ResUNet++ over its last five epochs."""
    return calc(lambda data: pick(get(data, ("segmenters", cvc_model("resunetpp"), "val_dice_per_epoch"))[-5:]))


def three(value: Callable[[float], Value]) -> tuple[Value, ...]:
    return tuple(value(sigma) for sigma in (0.25, 0.5, 1.0))


def in_millions(*path) -> Value:
    return calc(lambda data: get(data, path) / 1e6)


def in_billions(*path) -> Value:
    return calc(lambda data: get(data, path) / 1e9)


def preset_row(preset: str) -> tuple[Value, ...]:
    """Weights (M) and MACs (G) of each architecture at ``preset``, as the reference's presets table has them."""
    return tuple(value for arch in ("unet", "resunetpp", "deeplabv2")
                 for value in (in_millions("presets", preset, arch, "parameters"),
                               in_billions("presets", preset, arch, "macs")))


def candidate_row(name: str) -> tuple[Value, ...]:
    """A candidate width's weights, MACs, best validation Dice and its epoch."""
    return (in_millions("candidates", name, "parameters"), in_billions("candidates", name, "macs"),
            at("candidates", name, "best_val_dice", spec=".4f"), at("candidates", name, "best_epoch", spec="d"))


grid_hours = calc(lambda data: (data["diffusion_image_equivalents"] + data["images_without_diffusion"]) * 0.45 / 3600)
"""The paper grid's hours at the 0.45 s target, every image counted at the full cost (an upper bound)."""

JSRT, JSRT_256 = "book/jsrt.ipynb", "book/jsrt_256.ipynb"
ONE_SEED = "0471317:"  # the JSRT chapter on one training seed (seed 0), before it repeated over three
JSRT_BEFORE = ONE_SEED + JSRT
JSRT_COST, JSRT_VAL = "results/jsrt_chapter_cost.json", "results/jsrt_segmenters_val.json"
JSRT_SEED0_RESUNETPP = "jsrt_128_resunetpp_matched_e60_noise0.0_p8_bf16_seed0_data63cdaf5f7788.pt"
CXR, CXR_256, CVC = "book/cxr_lungs.ipynb", "book/cxr_lungs_256.ipynb", "book/cvc_clinicdb.ipynb"
CXR_256_BEFORE = "0b61ef2:book/cxr_lungs_256.ipynb"  # the earlier `tiny` UNet (5 epochs, fp32)
ABLATION_JSRT, ABLATION_CXR = "book/ablation_denoiser_jsrt.ipynb", "book/ablation_denoiser_cxr_lungs.ipynb"
OWN_MODEL = "book/figures/own_model/patient_certificate.json"


def elsewhere(value: Value, source: str) -> Value:
    """``value`` read from another committed JSON than the claim's (e.g. a chapter's earlier execution)."""
    return lambda _: value(load(source))


def dice_abstain(method: str, arch: str, sigma: str, code: str) -> tuple[Value, Value]:
    """A one-class chapter's certified Dice and its % abstained of the whole image, at one σ."""
    return (cell(method, arch, sigma, column=4, code=code), cell(method, arch, sigma, column=7, spec=".1f", code=code))


def paired(first: str, second: str, sigma: str, columns: tuple[int, ...], code: str) -> tuple[Value, ...]:
    """Cells of a chapter's paired-difference table, with the Unicode minus."""
    return tuple(cell(first, second, sigma, column=column, spec="minus", code=code) for column in columns)


def jsrt_ddpm_cost_on_cxr(pick: Callable[[list[float]], float]) -> Value:
    """The least or largest lung Dice the JSRT DDPM costs against cxr_lungs' own, over the three sigmas."""
    def text(notebook: Any) -> frozenset[str]:
        means = [abs(printed_number(cell("resunetpp", "ours (ddpm, trained on jsrt, single-step)", sigma, column=3,
                                         code="paired_differences"), notebook)) for sigma in SIGMAS]
        return fmt(pick(means), ".2f")
    return text


# the JSRT chapter's table in results/README.md: each cell "now (before) [paper]"; the paper's numbers are constants
JSRT_PAPER = {
    (OURS, "resunetpp"): (("0.95", "0.93", "0.78", "5"), ("0.94", "0.91", "0.63", "8"), ("0.90", "0.87", "0.28", "12")),
    (OURS, "unet"): (("0.94", "0.88", "0.75", "7"), ("0.90", "0.88", "0.61", "9"), ("0.87", "0.84", "0.23", "15")),
    (OURS, "deeplabv2"): (("0.94", "0.91", "0.85", "4"), ("0.88", "0.87", "0.63", "10"), ("0.88", "0.83", "0.20", "14")),
    (SEGCERTIFY, "resunetpp"): (("0.96", "0.93", "0.83", "4"), ("?", "?", "0.58", "13"), ("0.07", "0.02", "0.00", "24")),
    (SEGCERTIFY, "unet"): (("–",) * 4,) * 3,  # the paper's Table 2 has ResUNet++ only
    (SEGCERTIFY, "deeplabv2"): (("–",) * 4,) * 3,
}
JSRT_LABELS = {(OURS, "resunetpp"): "ours, ResUNet++", (OURS, "unet"): "ours, UNet",
               (OURS, "deeplabv2"): "ours, DeepLabV2", (SEGCERTIFY, "resunetpp"): "SegCertify, ResUNet++",
               (SEGCERTIFY, "unet"): "SegCertify, UNet", (SEGCERTIFY, "deeplabv2"): "SegCertify, DeepLabV2"}


STEPS_JSRT, MULTI_STEP = "book/ablation_denoising_steps_jsrt.ipynb", "ours (ddpm, 10-step)"
JSRT_SEGCERTIFY_COUNT = (r"σ = 0\.25\.\*\* By the paired 95 % interval over (?:\d+ training seeds and )?the test images \(\d+ or more per "
                         r"pair\), ours' "
                         r"certified Dice is ahead on (\d+), tied \(the interval holds 0\) on (\d+) and behind on (\d+)")
"""The chapter's "SegCertify against ours" sentence at σ = 0.25: pairs ahead, tied and behind by the paired intervals."""


def tiny_weights(arch: str) -> Value:
    """The `tiny` preset's parameters of ``arch`` in millions, one decimal (the reference's presets table)."""
    return calc(lambda data: data["presets"]["tiny"][arch]["parameters"] / 1e6, ".1f")


def jsrt_row(method: str, arch: str, index: int) -> Claim:
    """One row of results/README.md's certified JSRT table, now (three training seeds) and before (one seed,
    0471317) read from the two executions, the paper's numbers beside them."""
    sigma, shown = SIGMAS[index], ("0.25 (0.17)", "0.5 (0.34)", "1.0 (0.67)")[index]
    paper = JSRT_PAPER[(method, arch)][index]
    code = "paper_table(per_arch)" if method == OURS else "paper_table(comparison)"
    text = (f"| {JSRT_LABELS[(method, arch)]} | {shown} | {{}} ({{}}) [{paper[0]}] | {{}} ({{}}) [{paper[1]}] | "
            f"{{}} ({{}}) [{paper[2]}] | {{}} ({{}}) [{paper[3]}] |")
    values = tuple(value for column in (4, 7, 10) for value in (
        cell(method, arch, sigma, column=column, code=code),
        elsewhere(cell(method, arch, sigma, column=column, code=code), JSRT_BEFORE)))
    abstain = cell(method, arch, sigma, column=13, spec=".1f", code=code)
    return Claim(RESULTS, text, JSRT, values + (abstain, elsewhere(abstain, JSRT_BEFORE)))


JSRT_256_BEFORE, JSRT_256_VAL = "9d0493c:book/jsrt_256.ipynb", "results/jsrt_256_segmenters_val.json"



def jsrt_256_claims() -> list[Claim]:
    """results/README.md's section on UNet at 256 px: ours and SegCertify at 256 px, the 128 px chapter's UNet on
    the same images, the paired differences, the segmenters' validation, the cost and the previous execution."""
    table = "paper_table(comparison)"
    return [
        *[Claim(RESULTS, f"| {shown} | {{}} / {{}} / {{}}, {{}} % | {{}} / {{}} / {{}}, {{}} % | "
                         f"{{}} / {{}} / {{}}, {{}} % | {paper} |", JSRT_256,
                (*certified_row(OURS, "unet", sigma, table), *certified_row(SEGCERTIFY, "unet", sigma, table),
                 *(elsewhere(value, JSRT) for value in certified_row(OURS, "unet", sigma, "paper_table(per_arch)"))))
          for sigma, shown, paper in zip(SIGMAS, ("0.25 (0.17)", "0.5 (0.34)", "1.0 (0.67)"),
                                         ("0.94 / 0.88 / 0.75, 7 %", "0.90 / 0.88 / 0.61, 9 %", "0.87 / 0.84 / 0.23, 15 %"))],
        *[Claim(RESULTS, f"| {shown} | {{}} | {{}} | {{}} | {{}} |", JSRT_256,
                paired("unet", OURS, sigma, (3, 4, 5, 6), "ours_against_segcertify"))
          for sigma, shown in zip(SIGMAS, ("0.25", "0.5", "1.0"))],
        Claim(RESULTS, "Plain Dice on clean images: {} / {} / {} (no noise), {} / {} / {} (noise-trained)", JSRT_256,
              tuple(cell(method, "unet", "0.00", column=column, code=table)
                    for method in ("plain (noise 0)", "plain (noise 0.25)") for column in (4, 7, 10))),
        Claim(RESULTS, "best validation Dice {} at epoch {} (no noise) and {} at epoch {} (trained with sigma 0.25 "
                       "noise), `jsrt_256_segmenters_val.json`", JSRT_256_VAL,
              tuple(at("segmenters", {"noise_sigma": noise}, key, spec=spec) for noise in (0.0, 0.25)
                    for key, spec in (("best_val_dice", ".3f"), ("best_epoch", "d")))),
        Claim(RESULTS, "both trainings included, took {} s on 2 CPU cores (`jsrt_256_chapter_cost.json`)",
              "results/jsrt_256_chapter_cost.json", (at("total_seconds", spec=",.0f"),)),
        Claim(RESULTS, "SegCertify slightly ahead on heart and clavicle** (heart {}, clavicle {}, both intervals below 0, "
                       "the clavicle's only just), ours {} ahead on lung and abstaining {} points less", JSRT_256,
              (*(calc_from(cell("unet", OURS, "0.25", column=column, spec="minus", code="ours_against_segcertify"),
                           lambda text: text.split()[0]) for column in (4, 5)),
               *(unsigned_mean(cell("unet", OURS, "0.25", column=column, spec="minus", code="ours_against_segcertify"))
                 for column in (3, 6)))),
        Claim(RESULTS, "it abstains on no pixel ({} %) while certifying no organ; ours abstains on {} % and keeps "
                       "{} / {} / {}", JSRT_256,
              (cell(SEGCERTIFY, "unet", "1.00", column=13, spec=".1f", code=table),
               cell(OURS, "unet", "1.00", column=13, spec=".1f", code=table),
               *(cell(OURS, "unet", "1.00", column=column, code=table) for column in (4, 7, 10)))),
        Claim("book/intro.md", "JSRT's UNet at 256 px (the same 25 images) has SegCertify ahead on heart and clavicle, by "
                               "{} and {} (`jsrt_256.ipynb`)", JSRT_256,
              tuple(reversed_difference(cell("unet", OURS, "0.25", column=column, code="ours_against_segcertify"))
                    for column in (4, 5))),
        Claim("book/reference.md", "lung / heart / clavicle {} / {} / {} at sigma 1.0 with {} % abstaining, against "
                                   "SegCertify's {} / {} / {} (background certified everywhere, {} % abstaining)", JSRT_256,
              (*certified_row(OURS, "unet", "1.00", table), *certified_row(SEGCERTIFY, "unet", "1.00", table))),
        Claim(RESULTS, "test images) ours certified {} / {} / {}, {} / {} / {} and {} / {} / {} at sigma", JSRT_256_BEFORE,
              tuple(cell(OURS, "unet", sigma, column=column, code=table) for sigma in SIGMAS for column in (4, 7, 10))),
    ]


def beside_paper(arch: str, sigma: str, column: int) -> Value:
    """A cell of a dataset chapter's "Next to the paper" table, ours with ``arch`` at ``sigma``: 4 here, 5 the
    paper's number, 6 their difference (as printed, without a sign when positive)."""
    return cell("ours", "0.0", arch, sigma, column=column, code="next_to_paper")


def paper_lead_over_others(pick: Callable[[list[float]], float]) -> Value:
    """The least or largest lead of the paper's ResUNet++ over its UNet and DeepLabV2 (Table 1, Montgomery),
    over the three sigmas, as the Montgomery chapter prints the paper's numbers."""
    def text(notebook: Any) -> frozenset[str]:
        number = lambda arch, sigma: printed_number(beside_paper(arch, sigma, 5), notebook)
        return fmt(pick([number("resunetpp", sigma) - number(other, sigma)
                         for other in ("unet", "deeplabv2") for sigma in SIGMAS]), ".2f")
    return text


def matched_against_tiny_abstention(pick: Callable[[list[float]], float]) -> Value:
    """The least or largest extra whole-image abstention (points) of the matched JSRT segmenters (0471317) over the
    earlier `tiny` ones (4d7945a), ours, over the three architectures and sigmas."""
    def abstained(notebook: Any, arch: str, sigma: str) -> float:
        return printed_number(cell(OURS, arch, sigma, column=13, code="paper_table(per_arch)"), notebook)

    return calc(lambda _: pick([abstained(load(JSRT_BEFORE), arch, sigma) - abstained(load("4d7945a:" + JSRT), arch, sigma)
                                for arch in ARCH_LABELS for sigma in SIGMAS]), ".1f")


def paper_gap_claims() -> list[Claim]:
    """Sentences of results/README.md that compare a chapter with the paper or with an earlier execution by a
    range or a band, each number read from the executed chapters (the second audit of issue 36 found them stale)."""
    return [
        Claim(RESULTS, "0.25 and 0.5, and passed at 1.0**: {} / {} / {} here against the paper's {} / {} / {}, differences "
                       "{} / {} / {}, so within 0.03 at 0.25 and 0.5 and {} above the paper", MONTGOMERY,
              (*(beside_paper("resunetpp", sigma, 4) for sigma in SIGMAS),
               *(beside_paper("resunetpp", sigma, 5) for sigma in SIGMAS),
               *(calc_from(beside_paper("resunetpp", sigma, 6), lambda text: text.replace("-", MINUS)) for sigma in SIGMAS),
               beside_paper("resunetpp", "1.00", 6))),
        Claim(RESULTS, "(the paper: ResUNet++ ahead of UNet and DeepLabV2 by {} to {})", MONTGOMERY,
              (paper_lead_over_others(min), paper_lead_over_others(max))),
        Claim(RESULTS, "within 0.03 of the paper's {} / {} at sigma 0.25 and 0.5, and {} above its {} at 1.0",
              MONTGOMERY_SEEDS, (beside_paper("resunetpp", "0.25", 5), beside_paper("resunetpp", "0.50", 5),
                                 beside_paper("resunetpp", "1.00", 6), beside_paper("resunetpp", "1.00", 5))),
        Claim(RESULTS, "Yet its PSNR on this set is below FFDNet's at every σ (by {} / {} / {} dB, gate above)", CXR_GATE,
              three(lambda sigma: psnr_gap(sigma, FFDNET_BOX, "ddpm single-step, trained on jsrt", ".1f"))),
        Claim(RESULTS, "and abstained {} to {} points more; lung and heart moved", JSRT,
              (matched_against_tiny_abstention(min), matched_against_tiny_abstention(max))),
    ]


CLAIMS: list[Claim] = [
    # results/README.md: plain JSRT Dice per architecture
    *[Claim(RESULTS, f"| {label} | {epochs} | {{}} | {{}} | {{}} |", "results/jsrt_segmenters.json",
            tuple(at({"arch": arch}, "test_dice", name, spec=".3f") for name in ("lung", "heart", "clavicle")))
      for label, epochs, arch in [("UNet (256 px, resnet18 encoder)", 40, "unet"),
                                  ("ResUNet++ (128 px, base 8)", 30, "resunetpp"),
                                  ("DeepLabV2 (128 px, resnet18 backbone)", 30, "deeplabv2")]],
    # the DDPM's gate on the test split
    Claim(RESULTS, "| DDPM single-step | **{}** | **{}** | **{}** |", GATE, three(lambda s: psnr(s, SINGLE))),
    Claim(RESULTS, "| DDPM multi-step (10 calls) | {} | {} | {} |", GATE, three(lambda s: psnr(s, MULTI))),
    Claim(RESULTS, "| UNet denoiser (one per sigma) | {} | {} | {} |", GATE, three(lambda s: psnr(s, UNET))),
    Claim(RESULTS, "single-step is ahead of its own 10-step chain by {} / {} / {} dB and of the UNet denoisers "
                   "by {} / {} / {} dB", GATE,
          three(lambda s: psnr_gap(s, SINGLE, MULTI)) + three(lambda s: psnr_gap(s, SINGLE, UNET, ".1f"))),
    Claim(REFERENCE, "single-step PSNR {} / {} / {} dB at sigma 0.25 / 0.5 / 1.0, ahead of its own 10-step chain "
                     "({} / {} / {}) and of the UNet denoisers ({} / {} / {})",
          GATE, three(lambda s: psnr(s, SINGLE)) + three(lambda s: psnr(s, MULTI)) + three(lambda s: psnr(s, UNET))),
    # ... and on the validation split
    Claim(RESULTS, "| DDPM single-step | **{}** | **{}** | **{}** |", GATE_VAL, three(lambda s: psnr(s, SINGLE))),
    Claim(RESULTS, "| DDPM multi-step (10 calls) | {} | {} | {} |", GATE_VAL, three(lambda s: psnr(s, MULTI))),
    Claim(RESULTS, "| UNet denoiser (one per sigma) | {} | {} | {} |", GATE_VAL, three(lambda s: psnr(s, UNET))),
    Claim(RESULTS, "single-step ahead of its chain by {} / {} / {} dB and of the UNet denoisers by {} / {} / {} dB",
          GATE_VAL, three(lambda s: lead(s, MULTI, ".2f")) + three(lambda s: lead(s, UNET, ".1f"))),
    Claim(RESULTS, "| DDPM single-step, trained on JSRT | {} | {} | {} |", GATE_VAL, three(lambda s: psnr(s, SINGLE))),
    Claim(RESULTS, "| FFDNet, box shrink above 75/255 | {} | {} | {} |", GATE_VAL,
          three(lambda s: paired_cell(s, FFDNET_BOX))),
    Claim(RESULTS, "| FFDNet, no shrink | {} (the same: σ 0.25 ≤ 75/255) | {} | {} |", GATE_VAL,
          (at("rows", {"sigma": 0.25, "denoiser": FFDNET_RAW}, "psnr_db"),
           paired_cell(0.5, FFDNET_RAW), paired_cell(1.0, FFDNET_RAW))),
    Claim(RESULTS, "| DDPM single-step, trained on cxr_lungs | {} | {} | {} |", GATE_VAL,
          three(lambda s: paired_cell(s, "ddpm single-step, trained on cxr_lungs"))),
    Claim(RESULTS, "| UNet denoiser, trained on JSRT | {} | {} | {} |", GATE_VAL, three(lambda s: paired_cell(s, UNET))),
    # the gate on cxr_lungs
    Claim(RESULTS, "| DDPM single-step, trained on cxr_lungs | {} | {} | {} |", CXR_GATE, three(lambda s: psnr(s, SINGLE))),
    Claim(RESULTS, "| its 10-step chain | {} | {} | {} |", CXR_GATE, three(lambda s: paired_cell(s, MULTI))),
    Claim(RESULTS, "| FFDNet, box shrink above 75/255 | {} | {} | {} |", CXR_GATE,
          three(lambda s: paired_cell(s, FFDNET_BOX))),
    Claim(RESULTS, "| DDPM single-step, trained on JSRT | {} | {} | {} |", CXR_GATE,
          three(lambda s: paired_cell(s, "ddpm single-step, trained on jsrt"))),
    Claim(RESULTS, "| UNet denoiser, trained on cxr_lungs | {} | {} | {} |", CXR_GATE, three(lambda s: paired_cell(s, UNET))),
    Claim(RESULTS, "moved the single-step DDPM's PSNR by at most {} dB and a UNet denoiser's by up to {} dB",
          CXR_GATE, tuple(calc(lambda _, denoiser=denoiser: max(
              largest_psnr_change(load(FP32_GATES + gate), load(gate), denoiser) for gate in (GATE_VAL, CXR_GATE, CVC_GATE)))
              for denoiser in (SINGLE, UNET))),
    Claim(RESULTS, "FFDNet trails the in-domain DDPM even at σ = 0.25, by {} dB (interval excluding 0), and by {} and {} dB "
                   "at 0.5 and 1.0 with the shrink", CXR_GATE,
          tuple(calc(lambda data, sigma=sigma: -get(data, ("paired_against_single_step", {"sigma": sigma, "denoiser": FFDNET_BOX},
                                                          "mean_db")), spec)
                for sigma, spec in ((0.25, ".2f"), (0.5, ".1f"), (1.0, ".1f")))),
    Claim(RESULTS, "JSRT's adult radiographs costs {} to {} dB here", CXR_GATE,
          tuple(lead_over_sigmas(pick, lambda name: name.endswith("trained on jsrt")) for pick in (min, max))),
    Claim(RESULTS, "The earlier measurement, on fp32 trainings of the same settings, gave every row within {} dB of these",
          CXR_GATE, (calc(lambda data: largest_psnr_change(load(FP32_GATES + CXR_GATE), data)),)),
    # the gate on CVC-ClinicDB
    Claim(RESULTS, "single-step PSNR {} / {} / {} dB at sigma 0.25 / 0.5 / 1.0", CVC_GATE,
          tuple(at("rows", {"sigma": s, "denoiser": SINGLE}, "psnr_db", spec=".1f") for s in (0.25, 0.5, 1.0))),
    Claim(RESULTS, "FFDNet, which never saw colonoscopy, is {} [{}, {}] dB *ahead*", CVC_GATE,
          tuple(at("paired_against_single_step", {"sigma": 0.25, "denoiser": FFDNET_BOX}, key)
                for key in ("mean_db", "low_db", "high_db"))),
    Claim(RESULTS, "ahead of the 10-step chain by {} to {} dB and of the UNet denoisers by {} to {} dB", CVC_GATE,
          tuple(lead_over_sigmas(pick, lambda name, rival=rival: name == rival) for rival in (MULTI, UNET) for pick in (min, max))),
    Claim(RESULTS, "an earlier fp32 training of the same DDPM settings had measured {} / {} / {} dB as well",
          FP32_GATES + CVC_GATE,
          tuple(at("rows", {"sigma": s, "denoiser": SINGLE}, "psnr_db", spec=".1f") for s in (0.25, 0.5, 1.0))),
    Claim(RESULTS, "behind at 0.5 ({}) and 1.0 ({})", CVC_GATE,
          tuple(at("paired_against_single_step", {"sigma": s, "denoiser": FFDNET_BOX}, "mean_db", spec="signed2")
                for s in (0.5, 1.0))),
    # segmenters' validation Dice
    Claim(RESULTS, "(best validation Dice: ResUNet++ {}, UNet {}, DeepLabV2 {}, noise-trained ResUNet++ {};", CVC_VAL,
          tuple(cvc_segmenter(name, noise, "best_val_dice", ".3f")
                for name, noise in [("resunetpp", "0.0"), ("unet", "0.0"), ("deeplabv2", "0.0"), ("resunetpp", "0.25")])),
    Claim(RESULTS, "(best validation Dice ResUNet++ {}, UNet {}, DeepLabV2 {}, noise-trained ResUNet++ {}, each at the "
                   "last epoch, which gained under {} over the one before: `cxr_lungs_segmenters_val.json`)",
          "results/cxr_lungs_segmenters_val.json",
          (*[at("segmenters", {"arch": arch, "noise_sigma": noise}, "best_val_dice", spec=".3f")
             for arch, noise in [("resunetpp", 0.0), ("unet", 0.0), ("deeplabv2", 0.0), ("resunetpp", 0.25)]],
           calc(lambda d: 0.001 if all(s["best_epoch"] == s["epochs"] and s["val_dice_per_epoch"][-1]
                                       - s["val_dice_per_epoch"][-2] < 0.001 for s in d["segmenters"]) else 1.0, "g"))),
    Claim(RESULTS, "although ResUNet++ has the best validation Dice of the three ({})", "results/cxr_lungs_segmenters_val.json",
          (calc(lambda d: max(s["best_val_dice"] for s in d["segmenters"] if s["noise_sigma"] == 0
                              and s["arch"] == "resunetpp" and s["best_val_dice"] == max(
                                  t["best_val_dice"] for t in d["segmenters"] if t["noise_sigma"] == 0)), ".3f"),)),
    # box against bilinear shrinking
    Claim(RESULTS, "| box (medcert) | {} / {} / {} dB | {} | {} |", "results/jsrt_resize_ablation.json",
          tuple(at("psnr", {"sigma": s, "shrink": "box"}, "psnr_db") for s in (0.25, 0.5, 1.0))
          + (resize_certified("box", 0.5), resize_certified("box", 1.0))),
    Claim(RESULTS, "| antialiased bilinear | {} / {} / {} dB | {} | {} |", "results/jsrt_resize_ablation.json",
          tuple(at("psnr", {"sigma": s, "shrink": "bilinear"}, "psnr_db") for s in (0.25, 0.5, 1.0))
          + (resize_certified("bilinear", 0.5), resize_certified("bilinear", 1.0))),
    Claim(RESULTS, "box {} / {} / {} dB against bilinear {} / {} / {} dB at sigma 0.25 / 0.5 / 1.0; paired difference "
                   "box - bilinear (same images, same noise) {} [{}, {}], {} [{}, {}], {} [{}, {}] dB",
          "results/jsrt_resize_ablation_val.json",
          tuple(at("psnr", {"sigma": s, "shrink": shrink}, "psnr_db") for shrink in ("box", "bilinear")
                for s in (0.25, 0.5, 1.0))
          + tuple(value for s in ("0.25", "0.5", "1") for value in (
              at("psnr_box_minus_bilinear", s, "mean", spec="+.2f"), at("psnr_box_minus_bilinear", s, "low"),
              at("psnr_box_minus_bilinear", s, "high")))),
    # certify speed
    Claim(RESULTS, "Baseline {} s; medcert {} ms with numpy (**{}x**) and {} ms with torch on the CPU ({}x).",
          BENCH_CERTIFY, (at("seconds_baseline", spec=".1f"),
                          calc(lambda d: 1000 * d["seconds_medcert_numpy"], ".1f"), at("speedup_numpy", spec=".0f"),
                          calc(lambda d: 1000 * d["seconds_medcert_torch_cpu"], ".0f"),
                          at("speedup_torch_cpu", spec=".0f"))),
    # the JSRT chapter's certification cost
    Claim(RESULTS, "at a load average of {} to {} before the run (recorded in the JSON), the chapter's 24 runs",
          CHAPTER_SHARED, (calc(lambda d: min(d["load_average_before"]), ".1f"),
                           calc(lambda d: max(d["load_average_before"]), ".1f"))),
    Claim(RESULTS, "{} s against {} s one run after another", CHAPTER_SHARED,
          (at("seconds_per_image", "shared_draws", spec=".1f"), at("seconds_per_image", "one_by_one", spec=".1f"))),
    # the attack
    Claim(RESULTS, "(1 CPU thread, {} s with other jobs on the machine", ATTACK, (at("parameters", "seconds", spec=",.0f"),)),
    Claim(RESULTS, "| pixels attacked (certified at x) | {} | {} | {} | {} |", ATTACK,
          tuple(attack(m, s, "pixels_attacked") for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5))),
    Claim(RESULTS, "| certified pixels flipped to another class | {} | {} | {} | {} |", ATTACK,
          tuple(attack(m, s, "certified_flips") for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5))),
    Claim(RESULTS, "| undefended segmenter: pixels flipped by PGD | {} | {} | {} | {} |", ATTACK,
          tuple(attack(m, s, "base_flips") for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5))),
    Claim(RESULTS, "| 1 pixel: p before -> after (point bound), share | {} -> {} ({}), {} | {} -> {} ({}), {} | "
                   "{} -> {} ({}), {} | {} -> {} ({}), {} |", ATTACK,
          tuple(sharp(m, s, 1, key, spec) for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5)
                for key, spec in (("p_before", ".3f"), ("p_after", ".3f"), ("bound_point", ".3f"),
                                  ("drop_fraction_median", ".2f")))),
    Claim(RESULTS, "| 16 pixels: p before -> after, share | {} -> {}, {} | {} -> {}, {} | {} -> {}, {} | "
                   "{} -> {}, {} |", ATTACK,
          tuple(sharp(m, s, 16, key, spec) for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5)
                for key, spec in (("p_before", ".3f"), ("p_after", ".3f"), ("drop_fraction_median", ".2f")))),
    Claim(RESULTS, "| random direction of the same length: mean share, 1 pixel | {} | {} | {} | {} |", ATTACK,
          tuple(sharp(m, s, 1, "random_drop_fraction", ".3f") for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5))),
    # papermill's recorded durations of the chapters
    Claim(RESULTS, "the 128 px chapter's 14 runs took {} s, the training of their four segmenters and the DDPM included "
                   "(`cxr_lungs_chapter_cost.json`", "results/cxr_lungs_chapter_cost.json",
          (at("total_seconds", spec=",.0f"),)),
    Claim(RESULTS, "the 256 px chapter's 8 runs took {} s (`cxr_lungs_256_chapter_cost.json`)",
          "results/cxr_lungs_256_chapter_cost.json", (at("total_seconds", spec=",.0f"),)),
    Claim(RESULTS, "its notebook's execution, recorded by papermill, {} s (34 min)", "book/cxr_lungs_256.ipynb",
          (at("metadata", "papermill", "duration", spec=",.0f"),)),
    Claim(RESULTS, "the chapter's 16 runs took {} s on the 2-core Intel Xeon (`cvc_clinicdb_chapter_cost.json`)",
          "results/cvc_clinicdb_chapter_cost.json", (at("total_seconds", spec=",.0f"),)),
    Claim(RESULTS, "and the notebook's execution {} s (35 min, papermill's recorded duration)", CVC,
          (at("metadata", "papermill", "duration", spec=",.0f"),)),

    # book/reference.md: measured results
    Claim(REFERENCE, "per-pixel loop ({} s -> {} ms), identical labels", BENCH_CERTIFY,
          (at("seconds_baseline", spec=".1f"), calc(lambda d: 1000 * d["seconds_medcert_numpy"], ".0f"))),
    Claim(REFERENCE, "flipped **{}** of {} / {} certified pixels for ours at sigma 0.25 / 0.5 and {} of {} / {} for "
                     "SegCertify", ATTACK,
          (attack(OURS, 0.25, "certified_flips"), attack(OURS, 0.25, "pixels_attacked", ",d"),
           attack(OURS, 0.5, "pixels_attacked", ",d"), attack(SEGCERTIFY, 0.25, "certified_flips"),
           attack(SEGCERTIFY, 0.25, "pixels_attacked", ",d"), attack(SEGCERTIFY, 0.5, "pixels_attacked", ",d"))),
    Claim(REFERENCE, "segmenter in all {} images of every setting: {} / {} pixels (ours' segmenter) and {} / {} "
                     "(SegCertify's), against {} to {} for a random direction of the same length", ATTACK,
          (calc(lambda d: min(s["base_images_flipped"] for s in d["summary"]), "d"),
           attack(OURS, 0.25, "base_flips"), attack(OURS, 0.5, "base_flips"),
           attack(SEGCERTIFY, 0.25, "base_flips"), attack(SEGCERTIFY, 0.5, "base_flips"),
           calc(lambda d: min(s["base_random_flips"] for s in d["summary"]), "d"),
           calc(lambda d: max(s["base_random_flips"] for s in d["summary"]), "d"))),
    Claim(REFERENCE, "reference {} s per image; medcert fp32 {} s ({}x), fp32 + channels_last {} s ({}x), "
                     "bf16 + channels_last {} s (**{}x**)", QUICK,
          (at("reference", "seconds_per_image"), pipeline("fp32"), pipeline("fp32", "speedup_vs_reference", ".1f"),
           pipeline("fp32+cl"), pipeline("fp32+cl", "speedup_vs_reference", ".1f"), pipeline("bf16+cl"),
           pipeline("bf16+cl", "speedup_vs_reference", ".1f"))),
    Claim(REFERENCE, "the per-pixel loop costs only {} s at 64 x 64", QUICK,
          (at("reference", "split", "statistics_seconds"),)),
    Claim(REFERENCE, "reference {} s per image; medcert fp32 {} s ({}x), bf16 + channels_last {} s ({}x; the best of "
                     "the four settings, with random weights, at a load average of {} recorded in the JSON", PAPER_SMALL,
          (at("reference", "seconds_per_image", spec=".1f"), pipeline("fp32"),
           pipeline("fp32", "speedup_vs_reference", ".1f"), pipeline("bf16+cl"),
           pipeline("bf16+cl", "speedup_vs_reference", ".1f"), load_range)),
    Claim(REFERENCE, "the paper grid's {} certification runs ({} images' worth of diffusion calls over the whole test "
                     "splits, plus {} images without the DDPM) would take at most {} h", GRID_COST,
          (at("runs", spec="d"), at("diffusion_image_equivalents", spec=",d"), at("images_without_diffusion", spec=",d"),
           grid_hours)),
    Claim(REFERENCE, "{} s of install, {} s for the grid and {} s for the website. Of the grid, the six models took "
                     "{} s, two at a time, trained under bf16 autocast (`training_precision: auto`; the DDPM {} s; the "
                     "two segmenters {} and {} s; the three UNet denoisers {}, {} and {} s)", MAIN_JOB,
          (at("seconds", "install", spec=".0f"), at("seconds", "grid", spec=".0f"), at("seconds", "website", spec=".0f"),
           at("seconds", "of_which_models_trained_before_the_chapters", spec=".0f"),
           *(at("models_trained", index, "seconds", spec=".0f") for index in range(6)))),
    Claim(REFERENCE, "certifying at `precision: auto` (bf16), {}, {}, {} and {} s", MAIN_JOB,
          tuple(at("chapters", index, "seconds", spec=".0f") for index in range(4))),
    Claim(REFERENCE, "8 min 12 s, with {} s of install, {} s for the grid and {} s for the website; the six models "
                     "took {} s (the DDPM {} s; the two segmenters {} and {} s) and the four chapters {}, {}, {} and {} s",
          FP32_MAIN_JOB,
          (at("seconds", "install", spec=".0f"), at("seconds", "grid", spec=".0f"), at("seconds", "website", spec=".0f"),
           at("seconds", "of_which_models_trained_before_the_chapters", spec=".0f"),
           *(at("models_trained", index, "seconds", spec=".0f") for index in range(3)),
           *(at("chapters", index, "seconds", spec=".0f") for index in range(4)))),
    Claim(README, "It took **5 min 50 s** on this project's 2-core machine from a fresh clone on 2026-12-05 at commit {}, "
                  "install included ({} s install, {} s grid of which {} s training, {} s website", MAIN_JOB,
          (lambda data: frozenset([data["commit"][:7]]), at("seconds", "install", spec=".0f"),
           at("seconds", "grid", spec=".0f"), at("seconds", "of_which_models_trained_before_the_chapters", spec=".0f"),
           at("seconds", "website", spec=".0f"))),
    Claim(README, "It took **{}** on", MAIN_JOB,
          (lambda data: frozenset([f"{int(round(data['seconds']['total'])) // 60} min "
                                   f"{int(round(data['seconds']['total'])) % 60} s"]),)),
    *(Claim(REFERENCE, f"| `{preset}` | {{}} M, {{}} G | {{}} M, {{}} G | {{}} M, {{}} G |", PRESET_CHOICE,
            preset_row(preset)) for preset in ("tiny", "matched", "paper")),
    *(Claim(REFERENCE, f"| {label} | {{}} M | {{}} G | {{}} ({{}}) |", PRESET_CHOICE, candidate_row(name))
      for label, name in (("UNet, decoder 128-16 (chosen)", "unet-r18-d4-dec128"),
                          ("UNet, decoder 192-24", "unet-r18-d4-dec192"),
                          ("ResUNet++, 12 base channels (chosen)", "resunetpp-base12"),
                          ("ResUNet++, 16 base channels", "resunetpp-base16"),
                          ("DeepLabV2, 3 ResNet-18 stages (chosen)", "deeplabv2-r18-3stages"))),
    Claim(REFERENCE, "best validation polyp Dice {} at epoch {}, stopped at epoch {} of {}", CVC_CHOICE,
          (at("candidates", "resunetpp-base12", "best_val_dice", spec=".4f"),
           at("candidates", "resunetpp-base12", "best_epoch", spec="d"),
           at("candidates", "resunetpp-base12", "epochs_run", spec="d"), at("recipe", "max_epochs", spec="d"))),
    Claim(REFERENCE, "best validation polyp Dice ResUNet++ {} (epoch {}), UNet {} (epoch {}), DeepLabV2 {} (epoch {})",
          CVC_VAL, tuple(cvc_segmenter(arch, "0.0", key, spec) for arch in ("resunetpp", "unet", "deeplabv2")
                         for key, spec in (("best_val_dice", ".4f"), ("best_epoch", "d")))),
    Claim(REFERENCE, "ResUNet++'s last five epochs lie between {} and {} while its training loss still falls", CVC_VAL,
          tuple(cvc_resunetpp_last_five(pick) for pick in (min, max))),
    Claim(REFERENCE, "Its {} validation frames come from a few videos, and their Dice swings between {} and {}", CVC_CHOICE,
          (at("val_images", spec="d"),
           calc(lambda data: min(data["candidates"]["resunetpp-base12"]["val_dice_per_epoch"][1:])),
           calc(lambda data: max(data["candidates"]["resunetpp-base12"]["val_dice_per_epoch"])))),
    Claim(REFERENCE, "in their smallest form ({} s here, both steps exit 0:", "benchmarks/results/gpu_check_cpu_smallest.json",
          (at("elapsed_s", spec="d"),)),

    # book/performance.md
    Claim(PERFORMANCE, "| paper-style per-pixel loop (baseline) | {} | 1× | | medcert `certify`, numpy arrays | {} | {}× "
                       "faster | | medcert `certify`, torch tensors on the CPU | {} | {}× faster |", BENCH_CERTIFY,
          (at("seconds_baseline"), at("seconds_medcert_numpy", spec=".4f"), at("speedup_numpy", spec=".0f"),
           at("seconds_medcert_torch_cpu", spec=".4f"), at("speedup_torch_cpu", spec=".0f"))),
    Claim(PERFORMANCE, "{} % of the pixels are certified", BENCH_CERTIFY,
          (calc(lambda d: 100 * d["certified_fraction"], ".1f"),)),
    Claim(PERFORMANCE, "| reference (batch 1, fp32, per-pixel loop) | {} | {} / {} / {} | 1× |", QUICK,
          (at("reference", "seconds_per_image"), at("reference", "split", "denoiser_seconds"),
           at("reference", "split", "segmenter_seconds"), at("reference", "split", "statistics_seconds"))),
    *[Claim(PERFORMANCE, f"| {label} | {{}} | {{}} | {{}}× |", QUICK,
            (pipeline(setting), pipeline_split(setting), pipeline(setting, "speedup_vs_reference", ".1f")))
      for label, setting in [("medcert fp32", "fp32"), ("medcert fp32 + channels_last", "fp32+cl"),
                             ("medcert bf16", "bf16"), ("medcert bf16 + channels_last", "bf16+cl")]],
    Claim(PERFORMANCE, "| reference | {} | 1× |", PAPER_SMALL, (at("reference", "seconds_per_image"),)),
    *[Claim(PERFORMANCE, f"| {label} | {{}} | {{}}× |", PAPER_SMALL,
            (pipeline(setting), pipeline(setting, "speedup_vs_reference", ".1f")))
      for label, setting in [("medcert fp32", "fp32"), ("medcert fp32 + channels_last", "fp32+cl"),
                             ("medcert bf16", "bf16"), ("medcert bf16 + channels_last", "bf16+cl")]],
    Claim(PERFORMANCE, "random weights on a shared machine (load average {} in the JSON), one run: the fp32 row's three "
                       "images took {}, {} and {} s", PAPER_SMALL,
          (load_range,) + tuple(at("medcert", "fp32", "seconds_all_images", i) for i in range(3))),
    *[Claim(PERFORMANCE, "the JSONs record a load average of {} to {} at the start", source,
            (calc(lambda d: min(d["device"]["load_average_at_start"]), ".1f"),
             calc(lambda d: max(d["device"]["load_average_at_start"]), ".1f")))
      for source in (QUICK, PAPER_SMALL)],
    Claim(PERFORMANCE, "| one `certify` per architecture (the denoiser runs three times) | {} | "
                       "| `certify_segmenters` (the denoiser runs once) | {} | | ratio | {} |", SHARED,
          (at("seconds_per_image", "one_after_another", spec=".1f"), at("seconds_per_image", "shared_draws", spec=".1f"),
           at("ratio"))),
    Claim(PERFORMANCE, "The saving is the two denoiser passes skipped: {} − {} = {} s per image here, about {} s per "
                       "skipped pass.", SHARED,
          (at("seconds_per_image", "one_after_another", spec=".1f"), at("seconds_per_image", "shared_draws", spec=".1f"),
           calc(lambda d: d["seconds_per_image"]["one_after_another"] - d["seconds_per_image"]["shared_draws"], ".1f"),
           calc(lambda d: (d["seconds_per_image"]["one_after_another"] - d["seconds_per_image"]["shared_draws"]) / 2,
                ".1f"))),
    Claim(PERFORMANCE, "| one by one | {} | {} | | with shared draws | {} | {} | | ratio | {} | |", CHAPTER_SHARED,
          (at("seconds", "one_by_one", spec=".0f"), at("seconds_per_image", "one_by_one", spec=".1f"),
           at("seconds", "shared_draws", spec=".0f"), at("seconds_per_image", "shared_draws", spec=".1f"),
           at("ratio"))),
    Claim(PERFORMANCE, "3 images, at a load average of {} to {} before the run", CHAPTER_SHARED,
          (calc(lambda d: min(d["load_average_before"]), ".1f"), calc(lambda d: max(d["load_average_before"]), ".1f"))),
    Claim(PERFORMANCE, "{} distinct runs (SegCertify for every architecture of the JSRT chapter), {} images' worth of "
                       "diffusion calls (the 10-step ablation counts 10 per image) and {} images certified without "
                       "the DDPM", GRID_COST,
          (at("runs", spec="d"), at("diffusion_image_equivalents", spec=",d"), at("images_without_diffusion", spec=",d"))),
    Claim(PERFORMANCE, "(medcert's split: {} JSRT, {} Montgomery, {} Shenzhen, {} ISIC 2018, {} CVC-ClinicDB images)",
          GRID_COST, tuple(at("test_images", name, spec="d")
                           for name in ("jsrt", "montgomery", "shenzhen", "isic2018", "cvc_clinicdb"))),
    Claim(PERFORMANCE, "| quick: the tiny UNet behind the tiny DDPM, 64 px, σ 0.5, fp32 | {} |", QUICK, (pipeline("fp32"),)),
    Claim(PERFORMANCE, "| the same, the paper code's approach (batch 1, per-pixel loop) | {} |", QUICK,
          (at("reference", "seconds_per_image"),)),
    Claim(PERFORMANCE, "one `certify` each, σ 0.5 | {} |", SHARED, (at("seconds_per_image", "one_after_another", spec=".1f"),)),
    Claim(PERFORMANCE, "(18 smoothed, 6 clean), one by one | {} |", CHAPTER_SHARED,
          (at("seconds_per_image", "one_by_one", spec=".1f"),)),
    Claim(PERFORMANCE, "1,010 draws, σ 0.25 / 0.5 / 1.0 | {} / {} / {} |", SEQUENTIAL,
          tuple(at("sigmas", s, "sampling_seconds_per_image", spec=".1f") for s in ("0.25", "0.5", "1"))),

    # book/method.md: sequential certification
    Claim("book/method.md", "at n_max = 100, {} [{}, {}] / {} [{}, {}] / {} [{}, {}] at σ = 0.25 / 0.5 / 1.0; "
                            "at n_max = 1,000, {} / {} / {}", SEQUENTIAL,
          tuple(sequential(s, "100", "sequential", "minus_fixed", "mean_foreground_dice", key, spec="signed3")
                for s in ("0.25", "0.5", "1") for key in ("mean", "low", "high"))
          + tuple(sequential(s, "1000", "sequential", "minus_fixed", "mean_foreground_dice", "mean", spec="signed3")
                  for s in ("0.25", "0.5", "1"))),
    Claim("book/method.md", "Stopping at 1 % undecided saved {} / {} / {} % of the 1,000 draws", SEQUENTIAL,
          tuple(sequential(s, "1000", "sequential, stop at 0.01 undecided", "draws_saved_percent", spec=".1f")
                for s in ("0.25", "0.5", "1"))),
    Claim("book/method.md", "over n = 100 from {} / {} / {} to {} / {} / {}", SEQUENTIAL,
          tuple(sequential(s, n_max, "fixed", "mean_foreground_dice", spec=".2f")
                for n_max in ("100", "1000") for s in ("0.25", "0.5", "1"))),
    Claim("book/method.md", "at n_max = 100, τ = 0.95 and 0.99, which 100 draws cannot reach, stopped at the first look "
                            "({} draws) on every image", SEQUENTIAL,
          (calc(lambda d: get(d, ("sigmas", "1", "radius_curve", "100", {"tau": 0.99}, "sequential", "mean_draws")), ".0f"),)),

    # book/scale.md
    Claim("book/scale.md", "ran {}× faster than the paper code's approach in its best setting, bf16 + channels_last "
                           "({} against {} s per image), and {}× at fp32, in one run at a load average of {}",
          PAPER_SMALL, (pipeline("bf16+cl", "speedup_vs_reference", ".1f"), pipeline("bf16+cl"),
                        at("reference", "seconds_per_image", spec=".1f"), pipeline("fp32", "speedup_vs_reference", ".1f"),
                        load_range)),
    Claim("book/scale.md", "{} distinct runs over the whole test splits ({} JSRT, {} Montgomery, {} Shenzhen, {} ISIC "
                           "2018 and {} CVC-ClinicDB test images), {} images' worth of diffusion calls", GRID_COST,
          (at("runs", spec="d"),) + tuple(at("test_images", name, spec="d") for name in
                                          ("jsrt", "montgomery", "shenzhen", "isic2018", "cvc_clinicdb"))
          + (at("diffusion_image_equivalents", spec=",d"),)),

    # book/soundness.md
    Claim("book/soundness.md", "| pixels attacked (certified at x) | {} | {} | {} | {} |", ATTACK,
          tuple(attack(m, s, "pixels_attacked") for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5))),
    Claim("book/soundness.md", "| **undefended model: pixels flipped by PGD** | **{}** | **{}** | **{}** | **{}** |",
          ATTACK, tuple(attack(m, s, "base_flips") for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5))),
    Claim("book/soundness.md", "| … flipped by a random direction of length ε | {} | {} | {} | {} |", ATTACK,
          tuple(attack(m, s, "base_random_flips") for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5))),
    Claim("book/soundness.md", "| seconds (10 images; the sharp attack included) | {} | {} | {} | {} |", ATTACK,
          tuple(attack(m, s, "seconds", ".1f") for m in (OURS, SEGCERTIFY) for s in (0.25, 0.5))),
    Claim("book/soundness.md", "The whole experiment took {} s on one CPU thread", ATTACK,
          (at("parameters", "seconds", spec=".0f"),)),

    # numbers read from executed chapters' output tables (the notebooks are JSON too)
    *[Claim(RESULTS, f"| {label} | {{}} / {{}} / {{}}, {{}} % | {{}} / {{}} / {{}}, {{}} % | {{}} / {{}} / {{}}, {{}} % |",
            "book/ablation_denoiser_jsrt.ipynb", dice_row(method, "resunetpp"))
      for label, method in [("DDPM, single-step", "ours (ddpm, this dataset, single-step)"),
                            ("UNet denoiser (one per sigma)", "ours (unet)"),
                            ("none", "ours (no denoiser)"),
                            ("FFDNet, natural images only", FFDNET_OURS),
                            ("DDPM trained on cxr_lungs", "ours (ddpm, trained on cxr_lungs, single-step)")]],
    *[Claim(markdown, text, "book/ablation_denoiser_jsrt.ipynb",
            tuple(ranked(sigma, method) for method in ("ours (ddpm, this dataset, single-step)", "ours (unet)")
                  for sigma in SIGMAS))
      for markdown, text in [
          (RESULTS, "(mean certified Dice over the classes {} / {} / {} against the UNet denoisers' {} / {} / {})"),
          ("book/reference.md", "certifies more than the UNet denoisers (mean certified Dice {} / {} / {} against "
                                "{} / {} / {} at sigma")]],
    *[Claim(RESULTS, f"| {label} | {{}} / {{}} / {{}}, {{}} % | {{}} / {{}} / {{}}, {{}} % | {{}} / {{}} / {{}}, {{}} % |",
            "book/ablation_denoising_steps_jsrt.ipynb", dice_row(method, "resunetpp"))
      for label, method in [("single-step", OURS), ("10-step DDPM posterior", "ours (ddpm, 10-step)")]],
    Claim(RESULTS, "({} / {} / {} against {} / {} / {}; gaps {} / {} / {} in the chapter's ranking table)",
          "book/ablation_denoising_steps_jsrt.ipynb",
          tuple(ranked(sigma, method) for method in (OURS, "ours (ddpm, 10-step)") for sigma in SIGMAS)
          + tuple(ranked(sigma, "ours (ddpm, 10-step)", column=4, unsigned=True) for sigma in SIGMAS)),
    *[Claim(RESULTS, f"| {sigma:g}{'.0' if sigma == 1 else ''} | {{}} | {{}} | {{}} | {{}} |", STEPS_JSRT,
            tuple(cell("resunetpp", MULTI_STEP, f"{sigma:.2f}", column=column, spec="minus", code="paired_differences")
                  for column in (3, 4, 5, 6)))
      for sigma in (0.25, 0.5, 1.0)],
    Claim("book/intro.md", "e.g. clavicle {} at σ = 0.5", STEPS_JSRT,
          (cell("resunetpp", MULTI_STEP, "0.50", column=5, spec="minus", code="paired_differences"),)),
    *[Claim(RESULTS, f"| ours − SegCertify, {label} | {sigma:g}{'.0' if sigma == 1 else ''} | {{}} | {{}} | {{}} | {{}} |",
            "book/jsrt.ipynb", tuple(cell(arch, OURS, f"{sigma:.2f}", column=column, spec="minus",
                                          code="ours_against_segcertify") for column in (3, 4, 5, 6)))
      for label, arch in [("ResUNet++", "resunetpp"), ("UNet", "unet"), ("DeepLabV2", "deeplabv2")]
      for sigma in (0.25, 0.5, 1.0)],
    *[Claim(RESULTS, f"| {label} − ResUNet++ (ours) | {sigma:g}{'.0' if sigma == 1 else ''} | {{}} | {{}} | {{}} | {{}} |",
            "book/jsrt.ipynb", tuple(cell(arch, OURS, f"{sigma:.2f}", column=column, spec="minus",
                                          code="architectures_against_first") for column in (3, 4, 5, 6)))
      for label, arch in [("UNet", "unet"), ("DeepLabV2", "deeplabv2")] for sigma in (0.25, 0.5, 1.0)],
    *[Claim(markdown, text, JSRT, tuple(said(JSRT_SEGCERTIFY_COUNT, group) for group in groups))
      for markdown, text, groups in [
          (RESULTS, "The chapter's list counts, by the intervals, {} ahead, {} tied and {} behind of 9 pairs", (1, 2, 3)),
          (REFERENCE, "at 0.25 ahead on {}, tied on {} and behind on {} (one seed had SegCertify ahead", (1, 2, 3))]],
    # the matched preset's sizes as the re-executed JSRT chapter states them; the earlier tiny preset's from the
    # reference's presets table
    *[Claim(markdown, text, JSRT,
            tuple(said(r"parameters: resunetpp ([\d.]+ M), unet ([\d.]+ M), deeplabv2 ([\d.]+ M)", group)
                  for group in (1, 2, 3)))
      for markdown, text in [
          (RESULTS, "the `matched` preset gives ResUNet++ {} parameters, UNet {} and DeepLabV2 {}; the chapter's"),
          ("book/intro.md", "at matched capacity (ResUNet++ {} parameters, UNet {}, DeepLabV2 {})")]],
    *[Claim(markdown, text, PRESET_CHOICE, tuple(tiny_weights(arch) for arch in ("resunetpp", "unet", "deeplabv2")))
      for markdown, text in [
          (RESULTS, "(ResUNet++ {} M parameters, UNet {} M, DeepLabV2 {} M)"),
          (RESULTS, "the earlier `tiny` segmenters of unequal capacity (ResUNet++ {} M, UNet {} M, DeepLabV2 {} M parameters")]],
    Claim(RESULTS, "its {} segmenters trained in {} s of wall time in two one-thread processes before the runs, which "
                   "took {} s", JSRT_COST,
          (at("warm_up", "models", spec="d"), at("warm_up", "wall_seconds", spec=",.0f"), at("total_seconds", spec=",.0f"))),
    Claim(RESULTS, "best validation epochs {} to {} of 60, `jsrt_segmenters_val.json`)", JSRT_VAL,
          (best_epoch(min), best_epoch(max))),
    Claim(RESULTS, "seed 0's ResUNet++ reached a best validation Dice of {} now against {} then", JSRT_VAL,
          tuple(elsewhere(at("segmenters", {"model": JSRT_SEED0_RESUNETPP}, "best_val_dice", spec=".4f"), source)
                for source in (JSRT_VAL, ONE_SEED + JSRT_VAL))),
    Claim(RESULTS, "DeepLabV2 is ahead of ResUNet++ by {} and UNet by {}", JSRT,
          tuple(cell(arch, OURS, "1.00", column=5, spec="minus", code="architectures_against_first")
                for arch in ("deeplabv2", "unet"))),
    Claim(RESULTS, "The one-seed execution had UNet behind ResUNet++ on the clavicle at 0.5 and 1.0 ({})", JSRT_BEFORE,
          (calc_from(cell("unet", OURS, "1.00", column=5, spec="minus", code="architectures_against_first"),
                     lambda text: text.split()[0]),)),
    Claim(RESULTS, "the interval excluding 0 over its images ({} ahead, {} tied, {} behind)", JSRT_BEFORE,
          tuple(said(JSRT_SEGCERTIFY_COUNT, group) for group in (1, 2, 3))),
    Claim(RESULTS, "Certified lung Dice per seed: ResUNet++ {} / {} / {}, UNet {} / {} / {}", JSRT,
          tuple(cell(SEGCERTIFY, arch, "1.00", column=column, code="seeds_table")
                for arch in ("resunetpp", "unet") for column in (4, 5, 6))),
    Claim(RESULTS, "0.01 everywhere, where the one-seed execution's ResUNet++ certified {}", JSRT_BEFORE,
          (cell(SEGCERTIFY, "resunetpp", "1.00", column=7, code="paper_table(comparison)"),)),
    Claim(RESULTS, "0.12 on the clavicle (UNet at sigma 1.0: {} / {} / {})", JSRT,
          tuple(cell(OURS, "unet", "1.00", column=column, code="seeds_table") for column in (14, 15, 16))),
    Claim(RESULTS, "(the widest: ResUNet++'s lung at 1.0, {}), as in the one-seed", JSRT,
          paired("resunetpp", OURS, "1.00", (3,), "ours_against_segcertify")),
    Claim(RESULTS, "whose SegCertify certifies no organ pixel at any seed and abstains on {} % of the image", JSRT,
          (cell(SEGCERTIFY, "deeplabv2", "1.00", column=13, spec=".1f", code="paper_table(comparison)"),)),
    Claim(RESULTS, "no direction for ResUNet++ ({} points) and is positive for DeepLabV2 ({})", JSRT,
          tuple(calc_from(cell(arch, OURS, "1.00", column=6, spec="minus", code="ours_against_segcertify"),
                          lambda text: text.rsplit(" sd", 1)[0]) for arch in ("resunetpp", "deeplabv2"))),
    Claim("book/intro.md", "at σ = 1.0 DeepLabV2 is ahead of ResUNet++ on the clavicle by {} and UNet by {}, both "
                           "intervals excluding 0 (25 test images x 3 seeds)", JSRT,
          tuple(unsigned_mean(cell(arch, OURS, "1.00", column=5, code="architectures_against_first"))
                for arch in ("deeplabv2", "unet"))),
    Claim(RESULTS, "is ahead on the lungs of ResUNet++ and UNet ({} for UNet), every heart", JSRT,
          paired("unet", OURS, "0.25", (3,), "ours_against_segcertify")),
    Claim("book/intro.md", "Ours with ResUNet++ certifies {} / {} / {} at σ = 0.25 / 0.5 / 1.0 on 40 test frames "
                           "(capacity-matched segmenters over a whole 20-epoch schedule, one training each); the "
                           "architecture with the highest means at σ = 0.25, DeepLabV2, certifies {} / {} / {}, and UNet "
                           "{} / {} / {}", CVC,
          tuple(cell(OURS, arch, sigma, column=4, code="paper_table(per_arch)")
                for arch in ("resunetpp", "deeplabv2", "unet") for sigma in SIGMAS)),
    Claim("book/intro.md", "its validation Dice stopped improving at {} (half-size frames", CVC_VAL,
          (cvc_segmenter("resunetpp", "0.0", "best_val_dice", ".2f"),)),
    Claim("book/intro.md", "ResUNet++ itself is weak here: its plain polyp Dice on the same clean frames is {}", "book/cvc_clinicdb.ipynb",
          (cell("plain (noise 0)", "resunetpp", column=4, code="paper_table(comparison)"),)),
    Claim("book/intro.md", "certified lung Dice {} against the paper's 0.94; at σ = 1.0 it abstains on {} % of the image "
                           "against the paper's 12 % (UNet {} %, DeepLabV2 {} %", "book/jsrt.ipynb",
          (cell(OURS, "resunetpp", "0.50", column=4, code="paper_table(per_arch)"),
           *(cell(OURS, arch, "1.00", column=13, spec=".1f", code="paper_table(per_arch)")
             for arch in ("resunetpp", "unet", "deeplabv2")))),
    # Montgomery, Shenzhen, ISIC and the volumes, from the shared templates: the tables of results/README.md
    *dataset_chapter_claims(MONTGOMERY, {"resunetpp": ("0.96", "0.94", "0.89"), "unet": ("0.93", "0.89", "0.88"),
                                         "deeplabv2": ("0.93", "0.91", "0.85")}),
    *shenzhen_claims(),
    *montgomery_256_claims(),
    *montgomery_seeds_claims(),
    *cvc_seeds_claims(),
    *cxr_seeds_claims(),
    *hippocampus_claims(),
    *isic_claims(),
    *isic_seeds_claims(),
    *paper_gap_claims(),
    *main_job_without_bf16_claims(),
    *bf16_without_hardware_claims(),
    ffdnet_against_ddpm(MONTGOMERY, 27, "lung"),
    Claim("book/intro.md", "On Montgomery ResUNet++ certifies lung Dice {} / {} / {} at σ = 0.25 / 0.5 / 1.0 on all 27 test",
          MONTGOMERY, ours_dice()),
    Claim("book/intro.md", "Shenzhen it certifies {} / {} / {} on 40 test images", SHENZHEN,
          ours_dice()),
    Claim("book/intro.md", "is not seen ({} and {} here)", SHENZHEN,
          tuple(cell(OURS, "deeplabv2", sigma, column=4, code="paper_table(per_arch)") for sigma in SIGMAS[1:])),
    Claim(RESULTS, "has the higher PSNR at sigma 0.25 (+{} dB [+{}, +{}]; the DDPM works at 64 px", MONTGOMERY_GATE,
          tuple(pair_of(0.25, FFDNET_BOX, key) for key in ("mean_db", "low_db", "high_db"))),
    Claim(RESULTS, "and trails by {} dB at 1.0; Shenzhen's DDPM", MONTGOMERY_GATE,
          (pair_of(1.0, FFDNET_BOX, "mean_db", sign=-1),)),
    Claim(RESULTS, "trails the set's own by {} / {} / {} dB", MONTGOMERY_GATE,
          tuple(pair_of(sigma, "ddpm single-step, trained on shenzhen", "mean_db", sign=-1) for sigma in (0.25, 0.5, 1.0))),
    Claim(RESULTS, "FFDNet has the higher PSNR at sigma 0.25 by {} dB [{}, {}] and trails", "results/shenzhen_denoiser_gate_val.json",
          tuple(pair_of(0.25, FFDNET_BOX, key) for key in ("mean_db", "low_db", "high_db"))),
    Claim("book/intro.md", "than each set's own DDPM at σ = 0.25 (+{} and +{} dB", MONTGOMERY_GATE,
          (pair_of(0.25, FFDNET_BOX, "mean_db"),
           lambda _: fmt(get(load("results/shenzhen_denoiser_gate_val.json"),
                             ("paired_against_single_step", {"sigma": 0.25, "denoiser": FFDNET_BOX}, "mean_db")), ".2f"))),
    Claim("book/intro.md", "at 128 px (capacity-matched ResUNet++) by less than 0.01, ours − SegCertify {} (`cxr_lungs.ipynb`;",
          CXR, paired("resunetpp", OURS, "0.25", (3,), "ours_against_segcertify")),
    Claim("book/intro.md", "UNet is ahead of it at every σ (UNet − ResUNet++ {}, {}, {}), and DeepLabV2", CXR,
          tuple(value for sigma in SIGMAS for value in paired("unet", OURS, sigma, (3,), "architectures_against_first"))),
    Claim("book/intro.md", "ties at 256 px (capacity-matched UNet), ours − SegCertify {} lung Dice (`cxr_lungs_256.ipynb`)",
          CXR_256, paired("unet", OURS, "0.25", (3,), "ours_against_segcertify")),

    # the second audit (issue 36, item 5): the headline tables and comparisons not checked before
    # results/README.md: the certified JSRT table, now and before (ac280aa), next to the paper's constants
    *[jsrt_row(method, arch, index) for method, arch in JSRT_PAPER for index in range(3)],
    *[Claim(RESULTS, f"| {label} | 0 | {{}} / {{}}{paper[0]} | {{}} / {{}}{paper[1]} | {{}} / {{}}{paper[2]} | 0 |", JSRT,
            tuple(cell(method, arch, "0.00", column=column, code="paper_table(comparison)")
                  for column in (4, 7, 10) for method in ("plain (noise 0)", "plain (noise 0.25)")))
      for label, arch, paper in [
          ("plain, no noise / noise-trained, clean images: ResUNet++", "resunetpp",
           (" [0.97 / 0.91]", " [0.94 / 0.89]", " [0.93 / 0.84]")),
          ("the same, UNet", "unet", ("", "", "")), ("the same, DeepLabV2", "deeplabv2", ("", "", ""))]],
    Claim(RESULTS, "the chapter's 24 runs (18 smoothed, 6 clean) take about {} s per test image, {} min for the 25",
          CHAPTER_SHARED, (at("seconds_per_image", "shared_draws", spec=".0f"),
                           calc(lambda d: d["seconds_per_image"]["shared_draws"] * d["chapter_images"] / 60, ".0f"))),
    # the certified cxr_lungs table and its paired differences
    *[Claim(RESULTS, f"| {label} | {size} | {{}}, {{}} %{paper[0]} | {{}}, {{}} %{paper[1]} | {{}}, {{}} %{paper[2]} |", source,
            tuple(value for sigma in SIGMAS for value in dice_abstain(method, arch, sigma, code)))
      for label, size, source, method, arch, code, paper in [
          ("ours, ResUNet++", 128, CXR, OURS, "resunetpp", "paper_table(per_arch)",
           (" [0.96 / 0.95]", " [0.94 / 0.93]", " [0.89 / 0.90]")),
          ("ours, UNet", 128, CXR, OURS, "unet", "paper_table(per_arch)", (" [0.93 / 0.95]", " [0.89 / 0.93]", " [0.88 / 0.89]")),
          ("ours, DeepLabV2", 128, CXR, OURS, "deeplabv2", "paper_table(per_arch)",
           (" [0.93 / 0.80]", " [0.91 / 0.34]", " [0.85 / 0.04]")),
          ("SegCertify, ResUNet++", 128, CXR, SEGCERTIFY, "resunetpp", "paper_table(comparison)", ("", "", "")),
          ("ours, UNet", 256, CXR_256, OURS, "unet", "paper_table(per_arch)", ("", "", "")),
          ("SegCertify, UNet", 256, CXR_256, SEGCERTIFY, "unet", "paper_table(comparison)", ("", "", ""))]],
    *[Claim(RESULTS, f"| {label} − ResUNet++ (ours, 128 px), lung Dice | {{}} | {{}} | {{}} |", CXR,
            tuple(value for sigma in SIGMAS for value in paired(arch, OURS, sigma, (3,), "architectures_against_first")))
      for label, arch in [("DeepLabV2", "deeplabv2"), ("UNet", "unet")]],
    Claim(RESULTS, "| ours − SegCertify, ResUNet++ 128 px, lung Dice | {} (SegCertify ahead) | {} | {} | | the same, abstention (points) "
                   "| {} | {} | {} |", CXR,
          tuple(value for column in (3, 4) for sigma in SIGMAS
                for value in paired("resunetpp", OURS, sigma, (column,), "ours_against_segcertify"))),
    Claim(RESULTS, "| ours − SegCertify, UNet 256 px, lung Dice | {} | {} | {} | | the same, abstention "
                   "(points) | {} | {} | {} |", CXR_256,
          tuple(value for column in (3, 4) for sigma in SIGMAS
                for value in paired("unet", OURS, sigma, (column,), "ours_against_segcertify"))),
    Claim(RESULTS, "Plain lung Dice on clean images (no noise / noise-trained): ResUNet++ {} / {} at 128 px", CXR,
          tuple(cell(method, "resunetpp", "0.00", column=4, code="paper_table(comparison)")
                for method in ("plain (noise 0)", "plain (noise 0.25)"))),
    Claim(RESULTS, "ResUNet++ 0.97 / 0.95 at 128 px, UNet {} / {} at 256 px", CXR_256,
          tuple(cell(method, "unet", "0.00", column=4, code="paper_table(comparison)")
                for method in ("plain (noise 0)", "plain (noise 0.25)"))),
    # the 256 px re-execution (matched UNet) against the earlier `tiny` one (0b61ef2)
    Claim(RESULTS, "11 epochs (best validation Dice UNet {}, noise-trained UNet {}, each at the last epoch: "
                   "`cxr_lungs_256_segmenters_val.json`)", "results/cxr_lungs_256_segmenters_val.json",
          tuple(at("segmenters", {"arch": "unet", "noise_sigma": noise}, "best_val_dice", spec=".3f") for noise in (0.0, 0.25))),
    Claim(RESULTS, "At 256 px the matched UNet certifies {} / {} with less abstention ({} % / {} %) than any 128 px row",
          CXR_256, (*[cell(OURS, "unet", sigma, column=4, code="paper_table(per_arch)") for sigma in SIGMAS[1:]],
                    *[cell(OURS, "unet", sigma, column=7, spec=".1f", code="paper_table(per_arch)") for sigma in SIGMAS[1:]])),
    Claim(RESULTS, "the earlier `tiny` UNet (5 epochs, fp32) certified {} / {} there", CXR_256_BEFORE,
          tuple(cell(OURS, "unet", sigma, column=4, code="paper_table(per_arch)") for sigma in SIGMAS[1:])),
    Claim(RESULTS, "SegCertify was ahead at 256 px, by {}. At sigma = 1.0", CXR_256_BEFORE,
          (reversed_difference(cell("unet", OURS, "0.25", column=3, code="ours_against_segcertify")),)),
    Claim(RESULTS, "SegCertify's matched UNet at 256 px abstains on {} % of the image (the `tiny` one on {} %)", CXR_256,
          (cell(SEGCERTIFY, "unet", "1.00", column=7, spec=".1f", code="paper_table(comparison)"),
           elsewhere(cell(SEGCERTIFY, "unet", "1.00", column=7, spec=".1f", code="paper_table(comparison)"),
                     CXR_256_BEFORE))),
    # the certified CVC-ClinicDB table, its paired differences and the two splits
    *[Claim(RESULTS, f"| {label} | {{}}, {{}} % | {{}}, {{}} % | {{}}, {{}} % |", CVC,
            tuple(value for sigma in SIGMAS for value in dice_abstain(method, arch, sigma, code)))
      for label, method, arch, code in [("ours, ResUNet++", OURS, "resunetpp", "paper_table(per_arch)"),
                                        ("ours, UNet", OURS, "unet", "paper_table(per_arch)"),
                                        ("ours, DeepLabV2", OURS, "deeplabv2", "paper_table(per_arch)"),
                                        ("SegCertify, ResUNet++", SEGCERTIFY, "resunetpp", "paper_table(comparison)")]],
    *[Claim(RESULTS, f"| {label}, polyp Dice | {{}} | {{}} | {{}} | | the same, abstention (points) | {{}} | {{}} | {{}} |",
            CVC, tuple(value for column in (3, 4) for sigma in SIGMAS
                       for value in paired(first, OURS, sigma, (column,), code)))
      for label, first, code in [("ours − SegCertify, ResUNet++", "resunetpp", "ours_against_segcertify"),
                                 ("DeepLabV2 − ResUNet++ (ours)", "deeplabv2", "architectures_against_first"),
                                 ("UNet − ResUNet++ (ours)", "unet", "architectures_against_first")]],
    Claim(RESULTS, "Plain polyp Dice on the same 40 frames: ResUNet++ {} (no noise), {} (trained with noise 0.25)", CVC,
          tuple(cell(method, "resunetpp", "0.00", column=4, code="paper_table(comparison)")
                for method in ("plain (noise 0)", "plain (noise 0.25)"))),
    # what the CVC-ClinicDB chapter shows, and the execution before it (the tiny preset, 10 epochs)
    Claim(RESULTS, "ResUNet++ reaches {} [{}, {}] over the 120 test frames, and its validation Dice stays between {} and "
                   "{} over the last five of its 20 epochs", CVC,
          (*(cell("blocked (20 ids)", "polyp", column=column, code="plain_dice_by_split") for column in (2, 3, 4)),
           *(elsewhere(cvc_resunetpp_last_five(pick), CVC_VAL) for pick in (min, max)))),
    Claim(RESULTS, "Ours with ResUNet++ certifies {} / {} / {} at sigma 0.25 / 0.5 / 1.0, below the paper's 0.45", CVC,
          ours_dice()),
    Claim(RESULTS, "UNet certifies {} / {} at sigma 0.25 / 0.5 and DeepLabV2 {} / {} (validation Dice {} and {})", CVC,
          (*(cell(OURS, arch, sigma, column=4, code="paper_table(per_arch)")
             for arch in ("unet", "deeplabv2") for sigma in SIGMAS[:2]),
           *(elsewhere(cvc_segmenter(arch, "0.0", "best_val_dice", ".3f"), CVC_VAL) for arch in ("unet", "deeplabv2")))),
    Claim(RESULTS, "at sigma 1.0 by {}, both near zero", CVC,
          tuple(calc_from(value, lambda text: text.replace("+", ""))
                for value in paired("resunetpp", OURS, "1.00", (3,), "ours_against_segcertify"))),
    Claim(RESULTS, "so it abstains on nothing ({} %) while ours abstains on {} %", CVC,
          tuple(cell(method, "resunetpp", "1.00", column=7, spec=".1f", code="paper_table(comparison)")
                for method in (SEGCERTIFY, OURS))),
    Claim(RESULTS, "(commit 287e44d: the earlier `tiny` segmenters, 10 epochs, fp32) certified ResUNet++ {} / {} / {}, "
                   "UNet {} / {} / {} and DeepLabV2 {} / {} / {}, with SegCertify tied at sigma 0.25 and ResUNet++'s "
                   "plain Dice {}", "287e44d:book/cvc_clinicdb.ipynb",
          (*(cell(OURS, arch, sigma, column=4, code="paper_table(per_arch)")
             for arch in ("resunetpp", "unet", "deeplabv2") for sigma in SIGMAS),
           cell("plain (noise 0)", "resunetpp", column=4, code="paper_table(comparison)"))),
    Claim(RESULTS, "{} [{}, {}] on the blocked split ({} frames) against {} [{}, {}] on the random one ({} frames)", CVC,
          tuple(cell(split, "polyp", column=column, code="plain_dice_by_split")
                for split in ("blocked (20 ids)", "random") for column in (2, 3, 4, 5))),
    # the JSRT ablation "which denoiser": the in-domain DDPM's row and each denoiser against it, image by image
    Claim(RESULTS, "| DDPM trained on JSRT | {} / {} / {}, {} % | {} / {} / {}, {} % | {} / {} / {}, {} % |", ABLATION_JSRT,
          dice_row("ours (ddpm, this dataset, single-step)", "resunetpp")),
    *[Claim(RESULTS, f"| {label} | {shown} | {{}} | {{}} | {{}} | {{}} |", ABLATION_JSRT,
            paired("resunetpp", method, sigma, (3, 4, 5, 6), "paired_differences"))
      for label, method in [("FFDNet", FFDNET_OURS), ("DDPM trained on cxr_lungs", "ours (ddpm, trained on cxr_lungs, single-step)")]
      for sigma, shown in zip(SIGMAS, ("0.25", "0.5", "1.0"))],
    Claim(RESULTS, "e.g. lung {} at sigma 0.25", ABLATION_JSRT,
          (cell("resunetpp", "ours (unet)", "0.25", column=3, spec="minus", code="paired_differences"),)),
    # the cxr_lungs ablation "must the denoiser have seen the domain?"
    *[Claim(RESULTS, f"| {label} | {{}}, {{}} % | {{}}, {{}} % | {{}}, {{}} % |", ABLATION_CXR,
            tuple(value for sigma in SIGMAS for value in dice_abstain(method, "resunetpp", sigma, "paper_table")))
      for label, method in [("DDPM trained on cxr_lungs", "ours (ddpm, this dataset, single-step)"),
                            ("DDPM trained on JSRT", "ours (ddpm, trained on jsrt, single-step)"),
                            ("FFDNet, natural images only", FFDNET_OURS),
                            ("UNet denoisers trained on cxr_lungs", "ours (unet)"), ("no denoiser", "ours (no denoiser)")]],
    *[Claim(RESULTS, f"| {label} | {shown} | {{}} | {{}} |", ABLATION_CXR,
            paired("resunetpp", method, sigma, (3, 4), "paired_differences"))
      for label, method in [("FFDNet", FFDNET_OURS), ("DDPM trained on JSRT", "ours (ddpm, trained on jsrt, single-step)"),
                            ("UNet denoisers", "ours (unet)")]
      for sigma, shown in zip(SIGMAS, ("0.25", "0.5", "1.0"))],
    # UNet at 256 px
    *jsrt_256_claims(),
    # book/intro.md: the off-the-shelf denoiser on JSRT and on cxr_lungs
    Claim("book/intro.md", "FFDNet certifies lungs {} lower than the in-domain DDPM, and hearts {} lower. It certifies "
                           "the clavicles well below the DDPM's Dice ({} against {})", ABLATION_JSRT,
          (reversed_difference(cell("resunetpp", FFDNET_OURS, "0.25", column=3, code="paired_differences")),
           calc_from(cell("resunetpp", FFDNET_OURS, "0.25", column=4, code="paired_differences"),
                     lambda text: text.split()[0].lstrip("-")),
           cell(FFDNET_OURS, "resunetpp", "0.25", column=10, code="paper_table"),
           cell("ours (ddpm, this dataset, single-step)", "resunetpp", "0.25", column=10, code="paper_table"))),
    Claim("book/intro.md", "FFDNet certifies the lungs within {} of the in-domain DDPM at σ = 0.25 and {} behind at 0.5. "
                           "At σ = 1.0 it trails by {}.", ABLATION_CXR,
          (reversed_difference(cell("resunetpp", FFDNET_OURS, "0.25", column=3, code="paired_differences")),
           *(calc_from(cell("resunetpp", FFDNET_OURS, sigma, column=3, code="paired_differences"),
                       lambda text: text.split()[0].lstrip("-")) for sigma in ("0.50", "1.00")))),
    Claim(RESULTS, "FFDNet {} / {} / {} behind, JSRT's DDPM {} to {}.", "9ac772d:" + ABLATION_CXR,
          (*(calc_from(cell("resunetpp", FFDNET_OURS, sigma, column=3, code="paired_differences"),
                       lambda text: text.split()[0].lstrip("-")) for sigma in SIGMAS),
           *(jsrt_ddpm_cost_on_cxr(pick) for pick in (min, max)))),
    *[Claim(markdown, text, ABLATION_CXR, tuple(jsrt_ddpm_cost_on_cxr(pick) for pick in (min, max)))
      for markdown, text in [("book/intro.md", "on JSRT's adult radiographs costs {} to {} (capacity-matched"),
                             (RESULTS, "**The DDPM trained on JSRT's adult radiographs** costs {} to {} (at σ = 1.0")]],
    # the main job at fp32, and the paper grid's hours
    Claim(README, "{} at fp32 on 2026-12-02", FP32_MAIN_JOB,
          (lambda data: frozenset([f"{int(round(data['seconds']['total'])) // 60} min "
                                   f"{int(round(data['seconds']['total'])) % 60} s"]),)),
    Claim(PERFORMANCE, "At the target 0.45 s per image that is at most {} h of certification on one GPU", GRID_COST,
          (grid_hours,)),
    Claim("book/scale.md", "| 0.45 s | medcert's target on one H100 / H200 (a target, not a measurement) | at most {} h |",
          GRID_COST, (grid_hours,)),
    # book/own_model.md: what the DICOM file's certificate covers on the file itself
    Claim("book/own_model.md", "R = sigma x Phi^-1(tau) = 0.25 x 0.674 = {}", OWN_MODEL, (at("radius", spec=".3f"),)),
    Claim("book/own_model.md", "/ (1.732 x 0.281) = {} (`radius_on_the_file.unit_image`). Through the window's 1 / 4095 "
                               "per stored value, that is {} in stored 12-bit values", OWN_MODEL,
          (at("radius_on_the_file", "unit_image", spec=".3f"), at("radius_on_the_file", "stored_values", spec=".0f"))),
]


def test_every_claim_names_an_existing_markdown_file_and_json():
    for claim in CLAIMS:
        assert (ROOT / claim.markdown).is_file(), claim.markdown
        assert ":" in claim.source or (ROOT / claim.source).is_file(), claim.source
        assert load(claim.source), claim.source


@pytest.mark.parametrize("claim", CLAIMS, ids=[claim.name for claim in CLAIMS])
def test_the_markdown_states_what_its_json_says(claim: Claim):
    assert claim.stated_in(markdown(claim.markdown)), (
        f"{claim.markdown} no longer states what {claim.source} says; expected the text\n    "
        + "\n or ".join(sorted(claim.expected())))


def test_a_changed_json_value_fails_the_check():
    """The guard can fail: the same claim read from a JSON with one number moved is not in the Markdown."""
    claim = next(c for c in CLAIMS if c.source == ATTACK and "pixels attacked" in c.text and c.markdown == RESULTS)
    data = json.loads(json.dumps(load(ATTACK)))
    data["summary"][0]["pixels_attacked"] += 1
    assert claim.stated_in(markdown(claim.markdown))
    assert not claim.stated_in(markdown(claim.markdown), data)


def test_the_results_page_is_a_chapter_of_the_book():
    """results/README.md's comparisons with the paper are in the book: a toc chapter that includes the file."""
    from medcert_core.study.report.book import toc_files

    assert "book/results" in toc_files(ROOT)
    assert re.fullmatch(r"```\{include\} \.\./results/README\.md\s*```\s*", (ROOT / "book" / "results.md").read_text())
