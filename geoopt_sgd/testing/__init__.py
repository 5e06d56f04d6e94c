"""Dense float64 reference implementations, for tests, doctests and users' checks.

Everything here forms explicit matrices and is meant for small models
(P up to a few thousand): :mod:`.curvature` has the dense Hessian / GGN,
:mod:`.noise` the explicit gradient covariances and the papers' metrics,
:mod:`.noisy_gd` the covariance of each :class:`~geoopt_sgd.NoisyGD` noise kind.
"""

from .curvature import *  # noqa: F403
from .curvature import __all__ as _curvature_all
from .noise import *  # noqa: F403
from .noise import __all__ as _noise_all
from .noisy_gd import *  # noqa: F403
from .noisy_gd import __all__ as _noisy_gd_all

__all__ = [*_curvature_all, *_noise_all, *_noisy_gd_all]
