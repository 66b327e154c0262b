"""diffkern.ops: the public operator API. One function per operator; each validates its
arguments (errors name the argument) and runs as a torch custom op whose implementation picks
a backend at run time (see :mod:`diffkern._dispatch`)."""

from .chebyshev import chebyshev_basis, chebyshev_eval, chebyshev_fit, chebyshev_forecast

__all__ = ["chebyshev_basis", "chebyshev_eval", "chebyshev_fit", "chebyshev_forecast"]
from .poe import PoEVerifyResult, poe_draft, poe_verify, product_of_experts

__all__ += ["PoEVerifyResult", "poe_draft", "poe_verify", "product_of_experts"]
from .tabdiff import tabdiff_churn, tabdiff_guide, tabdiff_heun, tabdiff_observe, tabdiff_step

__all__ += ["tabdiff_churn", "tabdiff_guide", "tabdiff_heun", "tabdiff_observe", "tabdiff_step"]
