"""Hostile environments, each in a subprocess: a read-only install, unwritable caches, unreadable
model files, odd NUMBA_NUM_THREADS values, SIGINT and SIGPIPE in every output mode.

Every case ends in a clear line on stderr (a notice and success, or one error line and a non-zero
exit), never a traceback. Permission cases run unprivileged: as root (CI), through util-linux's
`setpriv` with every capability dropped, so that file permissions apply to root too.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import PYTHON, REPO, child, subprocess_env

UNPRIVILEGED = (
    [
        "setpriv",
        "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--",
    ]
    if os.geteuid() == 0
    else []
)


def cli(*args, env=None, unprivileged=False, timeout=600, **kw) -> subprocess.CompletedProcess:
    if unprivileged and UNPRIVILEGED:
        assert shutil.which("setpriv"), "util-linux's setpriv is needed to test permissions as root"
    # -m puts the working folder first on sys.path: run from a folder without the package in it
    cmd = (UNPRIVILEGED if unprivileged else []) + [PYTHON, "-m", "picogpt_fast", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or subprocess_env(), timeout=timeout, **kw)


def assert_one_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def readable_model(model_dir, tmp_path):
    """A copy of the small model, readable by anyone (the session's temp folders are not)."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir("small"), folder)
    tmp_path.chmod(0o755)
    return folder


def test_read_only_install_without_a_writable_home(readable_model, tmp_path):
    """The package in a read-only folder, HOME not writable, no NUMBA_CACHE_DIR: kernels are cached in
    a per-user temporary folder, weights converted in memory, each said in one line; then, with no
    writable temporary folder either, kernels compile in memory."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "picogpt_fast", site / "picogpt_fast", ignore=shutil.ignore_patterns("__pycache__"))
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    read_only(site)
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("NUMBA_CACHE_DIR", "PICOGPT_FAST_CACHE", "XDG_"))}
    env.update(PYTHONPATH=str(site), HOME=str(home), TMPDIR=str(tmp))
    home.chmod(0o555)
    r = cli("run", "Hello", "--model", readable_model, "-n", 4, "--dtype", "int8", env=env, unprivileged=True, cwd=home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() and "Traceback" not in r.stderr
    assert "no writable Numba cache" in r.stderr and "converted weights stay in memory" in r.stderr
    assert any(p.name.startswith("picogpt-fast-numba") for p in tmp.iterdir())
    # No writable temporary folder either (tempfile falls back to /tmp, which is always writable
    # here, so the test names an unwritable one the way tempfile.tempdir does)
    locked = tmp_path / "locked-tmp"
    locked.mkdir(mode=0o555)
    script = f"import sys, tempfile; tempfile.tempdir = {str(locked)!r}; from picogpt_fast.cli import main; main(sys.argv[1:])"
    cmd = [*UNPRIVILEGED, PYTHON, "-c", script, "run", "Hello", "--model", str(readable_model), "-n", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=home, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kernels compile in memory" in r.stderr and "Traceback" not in r.stderr


def test_unwritable_weights_cache(readable_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert (
        cli("run", "Hello", "--model", readable_model, "-n", 1, "--dtype", "int8").returncode == 0
    )  # int8 kernels cached: no compile notice below
    r = cli(
        "run",
        "Hello",
        "--model",
        readable_model,
        "-n",
        3,
        "--dtype",
        "int8",
        env=subprocess_env(PICOGPT_FAST_CACHE=str(locked / "cache")),
        unprivileged=True,
    )
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]
    notices = [line for line in r.stderr.splitlines() if line.startswith("picogpt-fast:")]
    assert len(notices) == 1 and "converted weights stay in memory" in notices[0]


@pytest.mark.parametrize("name", ["config.json", "vocab.json", "merges.txt", "model.safetensors", "."])
def test_unreadable_model_files(readable_model, name):
    target = readable_model / name
    target.chmod(0o000)
    try:
        r = cli("run", "Hello", "--model", readable_model, "-n", 3, unprivileged=True)
    finally:
        target.chmod(0o755 if target.is_dir() else 0o644)
    assert_one_error(r, "ermission denied" if name != "." else str(readable_model))


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "1.5"])
def test_odd_numba_num_threads_are_refused(model_dir, value):
    r = cli("run", "Hello", "--model", model_dir("small"), "-n", 2, env=subprocess_env(NUMBA_NUM_THREADS=value))
    assert_one_error(r, "NUMBA_NUM_THREADS")


@pytest.mark.parametrize("value", ["1", "3"])
def test_numba_num_threads_that_work(model_dir, value):
    r = cli("run", "Hello", "--model", model_dir("small"), "-n", 2, "-q", env=subprocess_env(NUMBA_NUM_THREADS=value))
    assert r.returncode == 0 and r.stdout.strip() and not r.stderr, r.stderr


def test_unknown_threading_layer(model_dir):
    r = cli("run", "Hello", "--model", model_dir("small"), "-n", 2, env=subprocess_env(NUMBA_THREADING_LAYER="fastest"))
    assert_one_error(r, "NUMBA_THREADING_LAYER")


MODES = {"plain": [], "stream": ["--stream"], "json": ["--json"], "file": ["--file", "PROMPTS"]}


@pytest.fixture(scope="module")
def long_model(model_dir):
    """A model with a long context, so that a generation lasts long enough to be interrupted."""
    folder = model_dir("small", std=0.25, n_ctx=1024)
    (folder / "prompts.txt").write_text("Hello\nThe weather\n", encoding="utf-8")
    return folder


def mode_args(mode, folder):
    return [str(folder / "prompts.txt") if a == "PROMPTS" else a for a in MODES[mode]]


@pytest.mark.parametrize("mode", list(MODES))
def test_sigpipe(long_model, mode):
    """Output piped into a reader that stops early (`| head -c 8`): exit 0, nothing on stderr."""
    prompt = [] if mode == "file" else ["Hello"]
    cmd = [
        PYTHON,
        "-m",
        "picogpt_fast",
        "run",
        *prompt,
        "--model",
        str(long_model),
        "-n",
        300,
        "--ignore-eos",
        "-q",
        *mode_args(mode, long_model),
    ]
    with child(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env()) as p:
        p.stdout.read(8)
        p.stdout.close()  # the reader is gone
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 0 and err == "", err


@pytest.mark.parametrize("mode", list(MODES))
def test_sigint(long_model, mode):
    """Ctrl-C during generation: exit 130, no traceback (the NumPy reference keeps the work going
    long enough to interrupt it mid-generation)."""
    prompt = [] if mode == "file" else ["Hello"]
    cmd = [
        PYTHON,
        "-m",
        "picogpt_fast",
        "run",
        *prompt,
        "--model",
        str(long_model),
        "-n",
        1000,
        "--clip",
        "--ignore-eos",
        "--backend",
        "numpy",
        *mode_args(mode, long_model),
    ]
    with child(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env()) as p:
        while b"loaded" not in p.stderr.readline():  # the model is loaded; generation starts now
            assert p.poll() is None
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert b"Traceback" not in err


SCORE_IN_A_PROCESS = """
import json, sys
import numpy as np
from picogpt_fast import GPT2
m = GPT2.from_pretrained(sys.argv[1])
text = " ".join(["Alan Turing theorized that computers would one day become", "Ünïcödé ☃ and emoji 🙂", "A" * 300] * 4)
lp = m.score(text)
print(json.dumps({"nll": float(-lp[~np.isnan(lp)].mean()), "logits": m.forward(m.tokenizer.encode(text)[:200]).sum(dtype=np.float64)}))
"""


def test_a_process_on_an_empty_kernel_cache_gets_what_later_processes_get(tmp_path, model_dir):
    """Numba's freshly compiled parallel kernels can round differently from the same kernels loaded
    from its cache; the first process (which finds the cache empty) must still get bitwise what
    every later one gets: it compiles in a child process and runs the cached code."""
    folder = model_dir("small", seed=5, std=0.25, n_ctx=256)
    env = subprocess_env(NUMBA_CACHE_DIR=str(tmp_path / "kernels"))
    runs = [
        subprocess.run([PYTHON, "-c", SCORE_IN_A_PROCESS, str(folder)], capture_output=True, text=True, env=env, timeout=900)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert "compiling the engine's float32 kernels" in runs[0].stderr and "compiling" not in runs[1].stderr
    assert runs[0].stdout == runs[1].stdout  # bitwise: the same digits


def test_one_compile_from_a_clones_root(tmp_path, model_dir):
    """A user runs the installed command from the root of a checkout (the README's set-up) on an
    empty kernel cache. The compile child must import the package the command imported, not the
    folder's `picogpt_fast` (here one that cannot even be imported): one compile notice, no fall-back."""
    clone = tmp_path / "clone"
    (clone / "picogpt_fast").mkdir(parents=True)
    (clone / "picogpt_fast" / "__init__.py").write_text("raise ImportError('the checkout, not the installed package')\n")
    command = Path(PYTHON).parent / "picogpt-fast"  # the console script: its own folder, not the working one, leads sys.path
    assert command.exists(), "the package must be installed (pip install -e . or pip install .)"
    env = subprocess_env(NUMBA_CACHE_DIR=str(tmp_path / "kernels"))
    env.pop("PYTHONPATH")  # as a user's shell has it
    args = [command, "run", "Hello", "--model", model_dir("small"), "-n", 2]
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=clone, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("compiling the engine's float32 kernels") == 1 and "failed" not in r.stderr, r.stderr
    assert list((tmp_path / "kernels").rglob("picogpt-fast-compiled-float32-*"))
