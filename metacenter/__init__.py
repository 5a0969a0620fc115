"""metacenter: a metadata center for AI inference clusters."""

__version__ = "0.1.0"
