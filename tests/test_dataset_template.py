"""The shared dataset template (notebooks/dataset.ipynb): one set of cells for the Montgomery, Shenzhen and
ISIC chapters, its heading and introduction written from the chapter's dataset, the paper tables beside it."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
import pytest

from medcert_core.data import load_dataset
from medcert_core.study.chapter import DatasetChapter
from medcert_core.study.grid.local import with_dataset_heading
from medcert_core.study.report import paper
from medcert_core.study.report.book import template_of, write_placeholders
from medcert_core.study.dataset_texts import DATASET_CHAPTERS, chapter_text, heading_markdown

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "notebooks" / "dataset.ipynb"
SHARED = REPO.parent / "shared" / "data"
FFDNET = f"ffdnet:{REPO.parent / 'shared' / 'weights' / 'ffdnet' / 'ffdnet_color.pth'}"


def test_the_executed_chapters_heading_is_its_datasets():
    template = nbformat.read(str(TEMPLATE), as_version=4)
    executed = with_dataset_heading(template, TEMPLATE, {"dataset": "shenzhen"})
    assert executed.cells[0].source.startswith("# Shenzhen: lungs\n\nThe paper's Shenzhen set")
    assert executed.cells[0].source == heading_markdown("shenzhen")
    default = with_dataset_heading(nbformat.read(str(TEMPLATE), as_version=4), TEMPLATE, {})
    assert default.cells[0].source.startswith("# Montgomery: lungs"), "the template's own dataset when the grid names none"
    other = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# JSRT")])
    assert with_dataset_heading(other, TEMPLATE, {"dataset": "shenzhen"}).cells[0].source == "# JSRT", \
        "a template that does not ask keeps its heading"


def test_a_dataset_without_a_text_gets_its_name_and_no_paper_table():
    text = chapter_text("folder")
    assert text.title == "folder: certified segmentation" and text.paper_tables == ()
    assert heading_markdown("folder").startswith("# folder: certified segmentation")


@pytest.mark.parametrize("dataset", sorted(DATASET_CHAPTERS))
def test_each_datasets_paper_tables_exist(dataset):
    for key in chapter_text(dataset).paper_tables:
        assert key in paper.PAPER_TABLES


@pytest.mark.parametrize(("dataset", "counts"), [("montgomery", "97 / 14 / 27"), ("shenzhen", "396 / 57 / 113"),
                                                 ("isic2017", "1,505 / 215 / 430")])
def test_the_split_counts_in_the_introduction_are_the_loaders(dataset, counts):
    root = SHARED / dataset
    if not root.is_dir():
        pytest.skip(f"{root} is not on this machine")
    sizes = [len(load_dataset(dataset, root, split, image_size=32)) for split in ("train", "val", "test")]
    assert f"{sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,}" == counts
    assert counts in chapter_text(dataset).about


def test_a_dataset_chapter_missing_from_the_book_gets_a_placeholder_from_the_shared_template(tmp_path):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/isic2017\n")
    (tmp_path / "book").mkdir()
    assert template_of("isic2017", REPO / "notebooks") == TEMPLATE
    assert template_of("jsrt", REPO / "notebooks") == REPO / "notebooks" / "jsrt.ipynb"
    (written,) = write_placeholders(tmp_path, REPO / "notebooks")
    text = nbformat.read(str(written), as_version=4).cells[0].source
    assert text.startswith("# ISIC 2017: skin lesions, in place of ISIC 2018\n")
    assert "notebook: dataset, output: isic2017" in text and "notebooks/dataset.ipynb" in text


def test_isic_next_to_the_papers_table_3_skin_lesion_column():
    rows = [{"method": method, "train_noise": noise, "arch": "resunetpp", "sigma": sigma, "image_id": "a",
             "class_id": class_id, "class_name": name, "dice": 0.8, "iou": 0.7, "abstain": 0.02, "abstain_in_class": 0.0}
            for method, noise in (("ours", 0.0), ("segcertify", 0.25)) for sigma in (0.25, 0.5, 1.0)
            for class_id, name in enumerate(("background", "lesion"))]
    table = paper.next_to_paper(pd.DataFrame(rows), "isic_table3")
    paper_dice = table[("lesion", "Dice", "paper")]
    assert [paper_dice.loc[("ours", 0.0, "resunetpp", s)] for s in (0.25, 0.5, 1.0)] == pytest.approx([0.85, 0.83, 0.77])
    assert [paper_dice.loc[("segcertify", 0.25, "resunetpp", s)] for s in (0.25, 0.5, 1.0)] == pytest.approx([0.79, 0.41, 0.0])
    assert table.loc[("segcertify", 0.25, "resunetpp", 0.5), ("lesion", "Dice", "Δ")] == pytest.approx(0.39)
    assert table.loc[("ours", 0.0, "resunetpp", 1.0), ("all", "%⊘", "paper")] == pytest.approx(6.0)


def test_other_denoisers_add_rows_of_ours_for_the_first_architecture_only(tmp_path):
    namespace = {**{name: value for name, value in nbformat_parameters().items()},
                 "dataset": "phantom", "data_root": None, "profile": "smoke", "image_size": 32, "sigmas": [0.5],
                 "archs": ["unet", "resunetpp"], "results_dir": str(tmp_path), "cache_dir": str(tmp_path),
                 "other_denoisers": {"off the shelf": FFDNET}}
    chapter = DatasetChapter.from_parameters(namespace)
    assert chapter.other_denoisers == (("off the shelf", FFDNET),)
    (method,) = chapter.other_denoiser_methods
    assert method.denoiser == FFDNET and "off the shelf" in method.label
    other = [run for run in chapter.runs() if run.method == method]
    assert [run.arch for run in other] == ["unet"], "the first architecture, at each sigma"
    without = DatasetChapter.from_parameters({**namespace, "other_denoisers": {}})
    assert len(chapter.runs()) == len(without.runs()) + 1
    assert without.other_denoisers_rows().empty and without.other_denoisers_against_ours().empty


def nbformat_parameters() -> dict:
    from medcert_core.study.grid.spec import template_parameters

    return template_parameters(TEMPLATE)
