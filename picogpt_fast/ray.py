"""The dataset functions under their first name: `from picogpt_fast.ray import score_dataset`
(picogpt_fast.datasets holds them)."""

from .datasets import generate_dataset, read, score_dataset, score_text, write

__all__ = ["generate_dataset", "read", "score_dataset", "score_text", "write"]
