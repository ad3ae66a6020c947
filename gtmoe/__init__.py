"""GT-MoE: a reproducible study of Mixture-of-Experts routers (RD-ESI versus the standard ones)."""

__version__ = "0.1.0"
