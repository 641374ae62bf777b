"""What a chapter of the shared dataset template (``notebooks/dataset.ipynb``) says about its data.

One template serves the paper's Montgomery, Shenzhen and skin-lesion chapters: its cells are the same
for every set, and what differs (the heading, what the images are, the paper tables to sit beside,
what differs from the paper's setting) is looked up here by the chapter's ``dataset`` parameter. The
grid runner writes :func:`heading_markdown` into the executed chapter's first cell (the template marks
that cell with ``metadata.medcert.heading = "dataset"``).
"""

from __future__ import annotations

from dataclasses import dataclass

DATASET_TEMPLATE = "dataset"  # notebooks/dataset.ipynb
HEADING_FROM_DATASET = "dataset"  # the template's metadata.medcert.heading that asks for this module's heading

EVERY_CHAPTER = (
    "Each row certifies every pixel of the test images with Holm's correction at level α; abstained pixels "
    "count against their class. **Ours** is a segmenter trained without noise behind a denoiser; **SegCertify** "
    "is the same architecture trained with Gaussian noise and no denoiser. The settings table states this run's "
    "scale (input size, test images, training profile, training seeds).")

CXR_DIFFERENCES = (
    "The paper certifies the radiographs at 512 px with OpenAI's 256×256 ADM (trained on natural images only) "
    "as its denoiser and segmenters of the full published sizes. This chapter certifies them at the size in the "
    "settings table (the shared copy is 256 px, squashed from the originals), with a small DDPM trained in the "
    "project on this set's own training split and the capacity-matched segmenters of the profile, all trained "
    "here. A certificate at a reduced size holds for the reduced input; the resize from 256 to 128 px has L2 "
    "operator norm at most 0.554 (`medcert_core.single_image.resize_norm_bound`), so a radius R at 128 px covers "
    "every perturbation of the 256 px image of norm below R / 0.554.")


@dataclass(frozen=True)
class DatasetChapterText:
    """A dataset's heading (``title``), its introduction (``about``, markdown), the keys of the paper
    tables its results sit beside (``paper_tables``, in ``paper.PAPER_TABLES``) and what differs from the
    paper's setting (``differences``, markdown)."""

    title: str
    about: str
    paper_tables: tuple[str, ...]
    differences: str


DATASET_CHAPTERS: dict[str, DatasetChapterText] = {
    "montgomery": DatasetChapterText(
        title="Montgomery: lungs",
        about=("The paper's Montgomery set (its Table 1, lung column): the 138 posteroanterior chest X-rays of the "
               "Montgomery County tuberculosis screening set (80 normal, 58 with tuberculosis) with hand-drawn "
               "lung masks, left and right merged into one class (`../shared/data/montgomery/README.md`). Split "
               "by case into 97 / 14 / 27 images (train / validation / test)."),
        paper_tables=("montgomery_table1",),
        differences=CXR_DIFFERENCES),
    "shenzhen": DatasetChapterText(
        title="Shenzhen: lungs",
        about=("The paper's Shenzhen set (its Table 1, lung column): the 566 radiographs of the Shenzhen No. 3 "
               "People's Hospital tuberculosis set that have a manual lung mask (the paper counts all 662 "
               "radiographs), both lungs as one class (`../shared/data/shenzhen/README.md`). Split by case into "
               "396 / 57 / 113 images (train / validation / test)."),
        paper_tables=("shenzhen_table1",),
        differences=CXR_DIFFERENCES),
    "isic2017": DatasetChapterText(
        title="ISIC 2017: skin lesions, in place of ISIC 2018",
        about=("The skin-lesion task of the paper's Table 3. The paper used the ISIC 2018 Task 1 release, which is "
               "not on this machine; this chapter reads its predecessor, ISIC 2017 Part 1: the 2,000 training and "
               "150 validation dermoscopy images with their official lesion masks (1,921 of them are also 2018 "
               "training images; `../shared/data/isic2017/README.md`). The 2017 test masks are not here, so the "
               "splits are made from these 2,150: 1,505 / 215 / 430 images (train / validation / test)."),
        paper_tables=("isic_table3",),
        differences=(
            "The paper certifies ISIC 2018 (2,594 images) with OpenAI's 256×256 ADM as its denoiser and a "
            "ResUNet++ of the published size, and its Table 3 gives ResUNet++ only. This chapter certifies the "
            "2017 release (the shared copy squashed to 256 px; the size in the settings table) with a DDPM "
            "trained in the project on this set's own training split and the profile's capacity-matched "
            "segmenters, all trained here. Our copy of the paper garbles Table 3's σ / R column; the three rows "
            "are read as σ = 0.25 / 0.5 / 1.0 (the R digits that survive, 7 / 4 / 7, are the last of 0.17 / "
            "0.34 / 0.67, σ Φ⁻¹(0.75)).")),
    "isic2018": DatasetChapterText(
        title="ISIC 2018: skin lesions",
        about=("The paper's skin-lesion set (its Table 3): the ISIC 2018 Task 1 training images with lesion masks "
               "(2,594; the layout medcert reads is in the Datasets chapter). Its test masks were never "
               "published, so the splits are made from the training images."),
        paper_tables=("isic_table3",),
        differences=(
            "The paper certifies it with OpenAI's 256×256 ADM as its denoiser; this chapter with the denoiser "
            "in the settings table. Our copy of the paper garbles Table 3's σ / R column; the three rows are read "
            "as σ = 0.25 / 0.5 / 1.0.")),
    "hippocampus": DatasetChapterText(
        title="Hippocampus MRI: certified volumetric segmentation",
        about=("The step the paper names as its future work: certified segmentation of whole 3D volumes. The Medical "
               "Segmentation Decathlon's Task04 (`../shared/data/hippocampus/README.md`): 260 T1-weighted MRI "
               "volumes cropped around one hippocampus, 1 mm voxels, anterior and posterior hippocampus labelled. "
               "Split by case into 182 / 26 / 52 volumes (train / validation / test); every volume is mapped to "
               "[0, 1] by one intensity window per storage group, chosen on the training split (the Datasets "
               "chapter), and padded to 43 × 59 × 47 voxels, the largest extent of each axis; the noise covers "
               "every voxel of the padded volume, the metrics count the real voxels only."),
        paper_tables=(),
        differences=("The paper certifies 2D images only and reports no volume; its closing sentence names 3D "
                     "imaging as future work. Nothing here sits beside a number of the paper.")),
}


def chapter_text(dataset: str) -> DatasetChapterText:
    """The text of ``dataset``'s chapter; a dataset without one (your own ``folder`` set) gets its name as
    the heading and no paper table."""
    return DATASET_CHAPTERS.get(dataset) or DatasetChapterText(
        title=f"{dataset}: certified segmentation",
        about=f"The `{dataset}` dataset, read from the folder in the settings table.",
        paper_tables=(), differences="The paper reports no numbers for this dataset.")


def heading_markdown(dataset: str) -> str:
    """The executed chapter's first cell: its heading, what the data is and what every row means."""
    text = chapter_text(dataset)
    return f"# {text.title}\n\n{text.about}\n\n{EVERY_CHAPTER}"
