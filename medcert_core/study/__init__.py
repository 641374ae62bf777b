"""The study around the core: certification runs with a results store, tables and figures in the
paper's layout, the papermill grid runner and the Jupyter Book (see book/reference.md, "The study and its commands").

    settings -> grid -> runs -> store;  report reads the store;  experiment / chapter: what a notebook calls

Chapter notebooks use only what is exported here.
"""

from medcert_core.study.chapter import DatasetChapter
from medcert_core.study.experiment import Experiment, clean_baselines, combine, project_root
from medcert_core.study.report.figures import (abstention_figure, abstention_maps, dice_against_radius,
                                              dice_against_sigma, show, show_markdown)
from medcert_core.study.dataset_texts import chapter_text
from medcert_core.study.report.paper import differences_from_paper, next_to_paper
from medcert_core.study.report.tables import (benchmark_table, paired_differences, paired_table, paper_table, radius_curve_table,
                                             ranking_per_sigma, seeds_table)
from medcert_core.study.runs.run import CertificationRun, Method, ours, plain, segcertify
from medcert_core.study.settings import PROFILES, SETTINGS, training_spec

__all__ = [
    "PROFILES", "SETTINGS", "CertificationRun", "DatasetChapter", "Experiment", "Method", "abstention_figure",
    "abstention_maps", "benchmark_table", "chapter_text", "clean_baselines", "combine", "dice_against_radius", "dice_against_sigma",
    "differences_from_paper", "next_to_paper", "ours", "paired_differences", "paired_table", "paper_table", "plain", "project_root", "radius_curve_table",
    "ranking_per_sigma", "seeds_table", "segcertify", "show", "show_markdown", "training_spec",
]
