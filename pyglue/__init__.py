"""diffkern: fused kernels and faithful reference implementations for diffusion sampling
(PoE-Bridge, Spectrum, TabDiff).

    import diffkern
    diffkern.backends()                 # which backends can run here, and why not
    with diffkern.use_backend("reference"):
        y = diffkern.ops.chebyshev_forecast(times, feats, t_query)
"""

__version__ = "0.1.0"

from . import ops
from ._dispatch import BackendError, BackendStatus, backends, use_backend

__all__ = ["BackendError", "BackendStatus", "backends", "ops", "use_backend", "__version__"]
