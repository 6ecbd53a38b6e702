"""openrlhf-epo: entropy-regularized policy optimization (Xu et al., arXiv 2509.22576) for OpenRLHF."""

from .config import PRESETS, EPOConfig, EPOConfigError

__version__ = "0.1.0"

__all__ = ["PRESETS", "EPOConfig", "EPOConfigError", "__version__"]
