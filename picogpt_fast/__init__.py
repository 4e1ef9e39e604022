"""picogpt-fast: GPT-2 inference on the CPU, compiled with Numba, checked against picoGPT's NumPy math."""

__version__ = "0.1.0"

from .config import GPT2Config
from .errors import PicoGPTError
from .model import GPT2
from .tokenizer import Tokenizer

__all__ = ["GPT2", "GPT2Config", "PicoGPTError", "Tokenizer", "__version__"]
