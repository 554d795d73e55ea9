"""rlalign: align vision-language models with RL and preference objectives."""

__version__ = "0.1.0"
