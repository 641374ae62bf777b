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

This chapter has not been executed for this site: its data was not on the machine that built it,
or its run did not fit there yet. Run it with the dataset's folder, e.g.

```bash
./run.sh study --profile paper --data-root DATA_DIR        # every chapter, on a GPU
./run.sh grid my_grid.yaml                                   # or only this one: notebook: {name}, output: {output}
```

The template, with its parameters cell, is `notebooks/{name}.ipynb`.
"""

def placeholder_text(title: str, template: str, output: str) -> str:
    """The markdown of a chapter not run here."""
    return PLACEHOLDER.format(title=title, name=template, output=output)


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
    the chapter's name extends with "_..." (a grid entry's ``output:``, e.g. jsrt_256 from jsrt), else the
    shared dataset template for a dataset it has a text for (``study.dataset_texts``: montgomery, isic2017...)."""
    from medcert_core.study.dataset_texts import DATASET_CHAPTERS, DATASET_TEMPLATE

    candidates = [Path(notebooks_dir) / f"{chapter}.ipynb"] + sorted(
        (path for path in Path(notebooks_dir).glob("*.ipynb") if chapter.startswith(f"{path.stem}_")),
        key=lambda path: -len(path.stem))
    candidates += [Path(notebooks_dir) / f"{DATASET_TEMPLATE}.ipynb"] if chapter in DATASET_CHAPTERS else []
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
        title = title_of(name, template)
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
            placeholder_text(title, template.stem, name))])
        notebook.metadata["medcert"] = {"placeholder": True}
        path = root / f"{file}.ipynb"
        written.append(write_atomically(path, lambda temporary: nbformat.write(notebook, str(temporary))))
    return written


def title_of(chapter: str, template: Path) -> str:
    """A chapter's title: its dataset's for the shared dataset template, else the template's heading."""
    from medcert_core.study.dataset_texts import DATASET_TEMPLATE, chapter_text

    if template.stem == DATASET_TEMPLATE:
        return chapter_text(chapter).title
    import nbformat

    return nbformat.read(template, as_version=4).cells[0].source.splitlines()[0].lstrip("# ")


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
