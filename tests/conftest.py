"""Shared fixtures: GPT-2's real tokenizer files, and small random GPT-2 checkpoints in Hugging Face
layout (config.json + model.safetensors + vocab.json + merges.txt) that go through the real loader."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from picogpt_fast import GPT2, GPT2Config
from picogpt_fast.checkpoint import save_pretrained
from picogpt_fast.weights import random_weights

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = Path(os.environ.get("PICOGPT_TOKENIZER_DIR", REPO.parent / "shared" / "gpt2-tokenizer"))
TOKENIZER_SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# Shapes the engine is checked on. Every model has GPT-2's real 50257-token vocabulary and tokenizer.
# std is wider than GPT-2's 0.02 init so that greedy decoding has clear top-1 margins and does not
# settle on one repeated token.
SHAPES = {
    "small": dict(n_embd=64, n_head=4, n_layer=2, n_ctx=128),
    "odd": dict(n_embd=96, n_head=3, n_layer=3, n_ctx=96),  # 3 heads x 32 dims
    "onehead": dict(n_embd=36, n_head=1, n_layer=2, n_ctx=64),
    "manyheads": dict(n_embd=80, n_head=20, n_layer=2, n_ctx=80),  # 20 heads x 4 dims
}
STD = 0.25


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory):
    """A weights cache of the test session's own (inherited by subprocesses), never the user's."""
    os.environ["PICOGPT_FAST_CACHE"] = str(tmp_path_factory.mktemp("weights-cache"))
    return Path(os.environ["PICOGPT_FAST_CACHE"])


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """GPT-2's vocab.json and merges.txt from ../shared/gpt2-tokenizer, hash-checked."""
    for name, digest in TOKENIZER_SHA256.items():
        path = TOKENIZER_DIR / name
        assert path.is_file(), f"{path} is missing: the tests need GPT-2's tokenizer files (set PICOGPT_TOKENIZER_DIR)"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} is not OpenAI's file"
    return TOKENIZER_DIR


def make_config(shape: str, **overrides) -> GPT2Config:
    return GPT2Config(n_vocab=50257, **{**SHAPES[shape], **overrides})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir):
    """model_dir(shape, **options) -> a folder with a random checkpoint of that shape (cached per session);
    keyword arguments other than the weights' options override the shape's config (n_ctx=256, ...)."""
    made: dict = {}

    def make(shape: str = "small", seed: int = 0, std: float = STD, prefix: str = "", dtype=np.float32, **config) -> Path:
        key = (shape, seed, std, prefix, np.dtype(dtype).str, tuple(sorted(config.items())))
        if key not in made:
            config = make_config(shape, **config)
            folder = tmp_path_factory.mktemp(f"model-{shape}")
            save_pretrained(
                folder, config, random_weights(config, seed=seed, std=std), tokenizer_dir=tokenizer_dir, prefix=prefix, dtype=dtype
            )
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def models(model_dir):
    """models(shape) -> (engine GPT2, reference GPT2) over the same loaded weights."""
    made: dict = {}

    def get(shape: str = "small"):
        if shape not in made:
            engine = GPT2.from_pretrained(model_dir(shape), backend="numba")
            reference = GPT2(engine.config, engine.weights, engine.tokenizer, backend="numpy")
            made[shape] = (engine, reference)
        return made[shape]

    return get


@pytest.fixture(autouse=True)
def fresh_logger():
    """Each test starts with the package's logger as a new process has it: a CLI run in process
    installs its notices handler and level, which must not decide what a later API test sees."""
    yield
    _reset_logger()


def _reset_logger() -> None:
    log = logging.getLogger("picogpt_fast")
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.setLevel(logging.NOTSET)
    log.propagate = True


@pytest.fixture
def notices(caplog):
    """notices() -> the package's log lines (what the command line shows on stderr) since the last
    call. Through caplog: pytest's own log capture keeps them from reaching stderr in process."""
    caplog.set_level(logging.INFO, logger="picogpt_fast")

    def take() -> str:
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("picogpt_fast")]
        caplog.clear()
        return "\n".join(lines) + "\n" if lines else ""

    return take


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit code, stdout, stderr) of `picogpt-fast args...`, in process."""
    from picogpt_fast.cli import main

    def run(*args):
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            _reset_logger()  # as when the command's process ends
        out, err = capsys.readouterr()
        return code, out, err

    return run


def subprocess_env(**extra) -> dict:
    """Environment for a child `python -m picogpt_fast ...` that sees this checkout's package."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


PYTHON = sys.executable


@contextlib.contextmanager
def child(args, **kwargs):
    """subprocess.Popen(args, **kwargs), killed and reaped when the block ends, whatever ends it (a
    failed assertion, a timeout): no test leaves a process behind."""
    p = subprocess.Popen([str(a) for a in args], **kwargs)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()


def wait_until(condition, seconds: float, what: str) -> None:
    """Poll `condition()` until it is true; fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)
