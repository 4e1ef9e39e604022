"""Dataset jobs on Ray Data (pip install 'picogpt-fast[ray]'): files (formats, checks, reading,
writing), actors (the model on Ray's workers, and the public functions), job (a whole job, as the
command line runs it)."""

from .actors import generate_dataset, score_dataset, score_text
from .files import read, write

__all__ = ["generate_dataset", "read", "score_dataset", "score_text", "write"]
