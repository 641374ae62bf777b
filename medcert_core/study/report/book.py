"""The Jupyter Book (1.x) website: placeholders for chapters not run here, offline assets, the build.

The book's root holds ``_config.yml`` and ``_toc.yml``; chapters live in ``book/``. Executed
notebooks come from the grid; a results chapter that has not been run on this machine gets a
one-cell placeholder saying how to run it, so the site always builds with every chapter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from medcert_core.io import write_atomically

PLACEHOLDER = """# {title}

This chapter has not been run on the machine that built this site (its data is not there).
Run it with the dataset's folder, e.g.

```bash
./run.sh study --profile paper --data-root DATA_DIR        # every chapter, on a GPU
./run.sh grid my_grid.yaml                                   # or only this one: notebook: {name}, output: {output}
```

The template, with its parameters cell, is `notebooks/{name}.ipynb`.
"""

MISSING_DATA = {  # the paper's datasets whose chapters the site's build does not run (no data given to it)
    "montgomery": {
        "data": "the Montgomery County chest X-ray set (138 images with left and right lung masks)",
        "source": "the U.S. National Library of Medicine's tuberculosis image data sets, "
                  "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets",
        "paper": "Table 1, Montgomery lung, certified Dice / IoU / %⊘ at σ = 0.25 / 0.5 / 1.0 (512 px): "
                 "UNet 0.93 0.89 0.07 / 0.89 0.80 0.07 / 0.88 0.80 0.14; ResUNet++ 0.96 0.93 0.02 / "
                 "0.94 0.89 0.03 / 0.89 0.83 0.07; DeepLabV2 0.93 0.91 0.07 / 0.91 0.87 0.02 / 0.85 0.79 0.17",
    },
    "shenzhen": {
        "data": "the Shenzhen chest X-ray set (662 radiographs, 566 of them with lung masks)",
        "source": "the U.S. National Library of Medicine's tuberculosis image data sets, "
                  "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets "
                  "(the lung masks are distributed separately; the layout is in the Datasets chapter)",
        "paper": "Table 1, Shenzhen lung, certified Dice / IoU / %⊘ at σ = 0.25 / 0.5 / 1.0 (512 px): "
                 "UNet 0.95 0.90 0.05 / 0.93 0.90 0.02 / 0.89 0.83 0.10; ResUNet++ 0.95 0.91 0.01 / "
                 "0.93 0.90 0.02 / 0.90 0.85 0.06; DeepLabV2 0.80 0.71 0.07 / 0.34 0.25 0.15 / 0.04 0.02 0.11",
    },
    "isic2018": {
        "data": "the ISIC 2018 Task 1 training set (2,594 dermatoscopy images with lesion masks)",
        "source": "the ISIC challenge's data page, https://challenge.isic-archive.com/data/#2018",
        "paper": "Table 3, skin lesions, ResUNet++, certified Dice / IoU / %⊘: SegCertify 0.79 0.68 0.07 / "
                 "0.41 0.27 0.06 / 0.00 0.00 0.01, ours 0.85 0.77 0.03 / 0.83 0.76 0.04 / 0.77 0.69 0.06, in "
                 "the order of the table's three rows (our copy of the paper garbles their σ and R columns: "
                 "presumably σ = 0.25 / 0.5 / 1.0)",
    },
}
MISSING_DATA_PLACEHOLDER = """# {title}

This chapter has not been run for this site: its data, {data}, was not part of the run that built
it. It can be had from {source}; the folder layouts medcert reads are in the [Datasets](datasets.md)
chapter.

Once it is there, this executes the chapter on a CPU at the JSRT study's scale (128 px, the first
25 test images) and rebuilds the site:

```bash
cat > grids/{output}.yaml <<'YAML'
parameters: {{profile: jsrt, dataset: {dataset}, data_root: "{{data_root}}", image_size: 128, test_images: 25}}
runs:
  - notebook: {name}
    output: {output}
YAML
./run.sh grid grids/{output}.yaml --data-root DIR && ./run.sh book
```

(`DIR`: the dataset's folder.) `./run.sh study --profile paper --data-root DATA_DIR --device cuda`
runs it at the paper's settings on a GPU, with every other chapter.

What the paper reports for it: {paper}.
"""


def placeholder_text(title: str, template: str, output: str) -> str:
    """The markdown of a chapter not run here: dataset-specific where its data is known to be missing."""
    dataset = next((name for name in MISSING_DATA if template == name), None)
    if dataset is None:
        return PLACEHOLDER.format(title=title, name=template, output=output)
    return MISSING_DATA_PLACEHOLDER.format(title=title, name=template, output=output, dataset=dataset,
                                           **MISSING_DATA[dataset])


def toc_files(root: str | Path) -> list[str]:
    """Every ``file:`` of the book's _toc.yml (root included), relative to ``root``, without suffix."""
    toc = yaml.safe_load((Path(root) / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries) -> None:
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def template_of(chapter: str, notebooks_dir: str | Path) -> Path | None:
    """The template a chapter is executed from: ``<chapter>.ipynb``, else the longest template name
    the chapter's name extends with "_..." (a grid entry's ``output:``, e.g. jsrt_256 from jsrt)."""
    candidates = [Path(notebooks_dir) / f"{chapter}.ipynb"] + sorted(
        (path for path in Path(notebooks_dir).glob("*.ipynb") if chapter.startswith(f"{path.stem}_")),
        key=lambda path: -len(path.stem))
    return next((path for path in candidates if path.is_file()), None)


def write_placeholders(root: str | Path, notebooks_dir: str | Path = "notebooks") -> list[Path]:
    """A markdown-only notebook for each toc chapter that has a template but no executed file."""
    import nbformat

    root = Path(root)
    written = []
    for file in toc_files(root):
        name = Path(file).name
        exists = any((root / f"{file}{suffix}").is_file() for suffix in (".ipynb", ".md"))
        template = template_of(name, notebooks_dir)
        if exists or template is None:
            continue
        title = nbformat.read(template, as_version=4).cells[0].source.splitlines()[0].lstrip("# ")
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
            placeholder_text(title, template.stem, name))])
        notebook.metadata["medcert"] = {"placeholder": True}
        path = root / f"{file}.ipynb"
        written.append(write_atomically(path, lambda temporary: nbformat.write(notebook, str(temporary))))
    return written


def copy_offline_assets(root: str | Path) -> Path:
    """Put plotly.js into the book's _static/ (the chapters' figures load it from there)."""
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    target = Path(root) / "_static" / "plotly.min.js"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def build_book(root: str | Path = ".", notebooks_dir: str | Path = "notebooks", quiet: bool = True) -> Path:
    """Build the website with jupyter-book; returns ``<root>/_build/html/index.html``."""
    root = Path(root).resolve()
    for required in ("_config.yml", "_toc.yml"):
        if not (root / required).is_file():
            raise FileNotFoundError(f"{root} is not a book root: {required} is missing")
    write_placeholders(root, notebooks_dir)
    copy_offline_assets(root)
    command = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(root)]
    if quiet:
        command.append("--quiet")
    completed = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    index = root / "_build" / "html" / "index.html"
    if not index.is_file():
        raise RuntimeError(f"jupyter-book finished but wrote no {index}")
    return index
