"""medcert: certified medical image segmentation with randomized smoothing.

The certificate (see :mod:`medcert_core.certify`): with probability at least ``1 - alpha``
over the noise draws, every pixel that is not :data:`ABSTAIN` keeps its smoothed class under
any L2 perturbation of the input with norm below ``Certificate.radius``.
"""

from medcert_core.certify import ABSTAIN, Certificate, certify, certify_counts

__all__ = ["ABSTAIN", "Certificate", "certify", "certify_counts"]
__version__ = "0.1.0"

# The version of the code that computes numbers (certificates, counts, metrics, trained weights).
# Stored runs and executed chapters are keyed by it instead of by the source: bump it, and write
# tests/golden_numbers.json again (python -m medcert_core.testing.golden --write), whenever a change
# moves a number; tests/test_golden.py fails until then.
NUMBERS_VERSION = 1
