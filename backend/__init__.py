"""FreeSeg-Diff pre-annotation backend for Label Studio."""

__version__ = "0.1.0"
