"""Write each chapter template's parameters cell from the schema (medcert_core.study.settings): every
shared setting with its one-line help, the template's own values kept.

    python scripts/format_templates.py            # rewrite notebooks/*.ipynb in place
    python scripts/format_templates.py --check    # exit 1 naming the templates that differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

from medcert_core.study.grid.spec import template_parameters
from medcert_core.study.settings import parameters_cell

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def formatted(template: Path) -> nbformat.NotebookNode:
    """The template with its parameters cell written from the schema (values unchanged)."""
    notebook = nbformat.read(str(template), as_version=4)
    values = template_parameters(template)
    for cell in notebook.cells:
        if "parameters" in cell.metadata.get("tags", []):
            cell.source = parameters_cell(values)
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report templates whose cell differs")
    args = parser.parse_args(argv)
    differing = []
    for template in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = formatted(template)
        if notebook != nbformat.read(str(template), as_version=4):
            differing.append(template.name)
            if not args.check:
                nbformat.write(notebook, str(template))
    print(("differ: " if args.check else "rewrote: ") + (", ".join(differing) or "none"))
    return 1 if args.check and differing else 0


if __name__ == "__main__":
    sys.exit(main())
