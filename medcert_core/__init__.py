"""medcert: certified medical image segmentation with randomized smoothing.

The certificate (see :mod:`medcert_core.certify`): with probability at least ``1 - alpha``
over the noise draws, every pixel that is not :data:`ABSTAIN` keeps its smoothed class under
any L2 perturbation of the input with norm below ``Certificate.radius``.
"""

from medcert_core.certify import ABSTAIN, Certificate, certify, certify_counts

__all__ = ["ABSTAIN", "Certificate", "certify", "certify_counts"]
__version__ = "0.1.0"
