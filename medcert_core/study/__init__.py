"""The study around the core: certification runs with a results store, tables and figures in the
paper's layout, the papermill grid runner and the Jupyter Book (see book/reference.md, "The study and its commands").

Chapter notebooks use only what is exported here.
"""

from medcert_core.study.experiment import Experiment, clean_baselines, combine, project_root
from medcert_core.study.paper import differences_from_paper, next_to_paper
from medcert_core.study.profiles import PROFILES, training_spec
from medcert_core.study.report import (abstention_maps, dice_against_radius, dice_against_sigma, paper_table,
                                      radius_curve_table, ranking_per_sigma, show, show_markdown)
from medcert_core.study.runs import CertificationRun, Method, ours, plain, segcertify

__all__ = [
    "PROFILES", "CertificationRun", "Experiment", "Method", "abstention_maps", "clean_baselines", "combine",
    "dice_against_radius", "dice_against_sigma", "differences_from_paper", "next_to_paper", "ours", "paper_table",
    "plain", "project_root", "radius_curve_table", "ranking_per_sigma", "segcertify", "show", "show_markdown", "training_spec",
]
