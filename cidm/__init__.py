"""CIDM Studio: Concept-Incremental text-to-image Diffusion (Dong et al., NeurIPS 2024), for diffusers."""

__version__ = "0.1.0"
