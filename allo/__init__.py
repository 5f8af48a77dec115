"""allo: ALLO (ALignment with Low-redundant Optimization, arXiv 2406.12606) training recipes on DeepSpeed."""
__version__ = "0.1.0"
