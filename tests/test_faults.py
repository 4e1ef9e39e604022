"""Nothing lost, nothing silently wrong: the ways a careless user, a hostile program or a full disk
can meet the project, each ending in the right result or one clear line. (Dataset jobs: test_ray.py;
the server: test_serve.py; the environment's permissions and signals: test_environments.py.)

A full disk is a small tmpfs mounted for the test (root can mount one; skipped with the reason where
it cannot)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from picogpt_fast import GPT2, Tokenizer
from picogpt_fast.errors import CheckpointError, ConcurrencyError, InvalidArgumentError

from .conftest import PYTHON, subprocess_env


def cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "picogpt_fast", *map(str, args)], capture_output=True, text=True, env=env or subprocess_env(), timeout=600, **kw
    )


def assert_one_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@contextlib.contextmanager
def full_disk(folder: Path, size: str = "64k"):
    """A tiny tmpfs at `folder` (root only; the test is skipped otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({r.stderr.strip() or 'not root'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# --------------------------------------------------------------------------- sessions
def test_interleaved_generators_on_one_thread_get_their_own_state(models):
    """Two items of a stream, another call on the same thread, then the rest of the stream: the same
    ids as the stream alone (every call in flight has a session of its own)."""
    eng, _ = models("small")
    alone = list(eng.stream([5, 6, 7], 12, stop_at_eos=False))
    stream = eng.stream([5, 6, 7], 12, stop_at_eos=False)
    first = [next(stream), next(stream)]
    other = eng.generate([100, 200], 6, stop_at_eos=False)
    inner = eng.stream([9], 5, stop_at_eos=False)
    next(inner)
    assert first + list(stream) == alone
    assert other == eng.generate([100, 200], 6, stop_at_eos=False)
    assert len([next(inner)] + list(inner)) == 4


def test_a_session_entered_from_a_second_thread_raises_at_once(models):
    eng, _ = models("small")
    session = eng.session(1, 64)
    outcome = []
    with session._entered():  # a call of this session running on this thread
        t = threading.Thread(target=lambda: outcome.append(_call(session.prefill, [1, 2, 3])))
        t.start()
        t.join(timeout=30)
    assert isinstance(outcome[0], ConcurrencyError) and "give each thread its own session" in str(outcome[0])
    assert session.prefill([1, 2, 3]).shape == (eng.config.n_vocab,)  # free again once the call ended


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def test_one_model_from_many_threads_gives_each_its_solo_result(models):
    eng, _ = models("small")
    prompts = [[i, i + 1, i + 2] for i in range(1, 9)]
    want = [eng.generate(p, 8, stop_at_eos=False) for p in prompts]
    got = [None] * len(prompts)

    def work(k):
        for i in range(k, len(prompts), 4):
            got[i] = eng.generate(prompts[i], 8, stop_at_eos=False)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert got == want


# --------------------------------------------------------------------------- the weights cache
def cache_entry(cache: Path) -> Path:
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 1, entries
    return entries[0]


def test_an_edit_in_place_with_its_time_set_back_is_a_new_checkpoint(model_dir, tmp_path, monkeypatch):
    """The checkpoint is changed in place and its modification time restored (as a careless copy
    tool does): the cached conversion must not be used, by the engine or by --backend numpy."""
    monkeypatch.setenv("PICOGPT_FAST_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(model_dir("small"), folder)
    ids = [1, 2, 3, 4]
    before = GPT2.from_pretrained(folder, dtype="int8").forward(ids)
    weights = folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4000:-2000] = bytes(2000)  # zero part of the last tensor, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for backend in ("numba", "numpy"):
        after = GPT2.from_pretrained(folder, dtype="int8", backend=backend).forward(ids)
        assert not np.allclose(after, before, atol=1e-3), backend


def test_a_cache_entry_whose_bytes_changed_is_rebuilt_not_used(model_dir, tmp_path, monkeypatch, notices):
    monkeypatch.setenv("PICOGPT_FAST_CACHE", str(tmp_path))
    folder = model_dir("small")
    ids = [3, 1, 4, 1, 5]
    good = GPT2.from_pretrained(folder, dtype="int8").forward(ids)
    entry = cache_entry(tmp_path)
    data = bytearray(entry.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x7f" * 64  # the same size, other bytes
    entry.write_bytes(bytes(data))
    notices()
    again = GPT2.from_pretrained(folder, dtype="int8")
    assert "corrupt (checksum mismatch); rebuilding them" in notices()
    assert np.array_equal(again.forward(ids), good)
    assert entry.read_bytes() != bytes(data)  # rewritten, so the next start maps it again


def test_a_converted_folder_that_was_damaged_is_refused(model_dir, tmp_path, cli):
    code, _, err = cli("convert", model_dir("small"), "--dtype", "int8", "-o", tmp_path / "int8")
    assert code == 0, err
    weights = tmp_path / "int8" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"do not match their checksum\); convert the model again"):
        GPT2.from_pretrained(tmp_path / "int8")


def test_a_cache_on_a_full_disk_is_a_notice_and_the_run_goes_on(model_dir, tmp_path):
    with full_disk(tmp_path / "full") as cache:
        r = cli(
            "run", "Hello", "--model", model_dir("small"), "-n", 3, "--dtype", "int8", env=subprocess_env(PICOGPT_FAST_CACHE=str(cache))
        )
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "cannot write the weights cache" in r.stderr and "stay in memory" in r.stderr
        assert not [p for p in cache.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".tmp")]  # nothing a later run would trust


def test_a_cache_in_the_home_of_no_user_is_one_line(model_dir):
    r = cli(
        "run", "Hello", "--model", model_dir("small"), "-n", 2, "--dtype", "int8", env=subprocess_env(PICOGPT_FAST_CACHE="~nosuchuser/x")
    )
    assert_one_error(r, "PICOGPT_FAST_CACHE", "user that does not exist")


def test_convert_on_a_full_disk_leaves_nothing_that_loads(model_dir, tmp_path):
    with full_disk(tmp_path / "full", size="2m") as disk:
        r = cli("convert", model_dir("small"), "--dtype", "int8", "-o", disk / "out")
        assert_one_error(r, "cannot write", "nothing was written")
        assert list(disk.iterdir()) == []


# --------------------------------------------------------------------------- the tokenizer
def test_a_cut_short_or_empty_merges_file_is_refused(tokenizer_dir, tmp_path):
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    for name, lines in (("cut", merges[: len(merges) // 3]), ("empty", [])):
        (tmp_path / f"{name}.txt").write_text("".join(lines), encoding="utf-8")
        with pytest.raises(CheckpointError, match="are no merge's result: the file is cut short"):
            Tokenizer.from_files(tokenizer_dir / "vocab.json", tmp_path / f"{name}.txt")


def test_token_ids_that_are_not_integers_and_text_that_is_not_unicode_are_refused(tokenizer_dir, models):
    tok = Tokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    assert tok.decode([15496, np.int64(995)]) == "Hello world"
    for bad in ([15496.7], [15496.0], [True]):
        with pytest.raises(InvalidArgumentError, match="is not an integer"):
            tok.decode(bad)
    with pytest.raises(InvalidArgumentError, match=r"lone surrogate \(U\+D800 at character 3\)"):
        tok.encode("abc\ud800")
    eng, _ = models("small")
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        eng.generate("Hello \udc80", 2)


# --------------------------------------------------------------------------- the command line's output
@pytest.mark.parametrize(
    "args",
    [
        ("run", "Hello", "-n", "3"),
        ("run", "Hello", "-n", "3", "--json"),
        ("run", "Hello", "-n", "3", "--stream"),
        ("tokenize", "Hello world"),
        ("score", "{text}"),
    ],
    ids=["run", "json", "stream", "tokenize", "score"],
)
def test_results_to_a_full_disk_or_a_closed_stdout_are_one_line(model_dir, tmp_path, args):
    (tmp_path / "text.txt").write_text("It was the best of times, it was the worst of times.")
    argv = [PYTHON, "-m", "picogpt_fast", *[a.format(text=tmp_path / "text.txt") for a in args], "--model", str(model_dir("small"))]
    with open("/dev/full", "w") as full:
        r = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, env=subprocess_env(), timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1] == "error: cannot write the results (No space left on device); free some space or write them elsewhere", r.stderr
    closed = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=None,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        timeout=600,
        preexec_fn=lambda: os.close(1),
    )
    assert closed.returncode == 1 and closed.stderr.strip().splitlines() == [
        "error: stdout is closed, so the results would be lost; redirect it to a file (or to /dev/null to discard them)"
    ], closed.stderr


def test_a_lone_surrogate_in_a_jsonl_line_names_the_line(model_dir, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800"}\n')
    r = cli("run", "--jsonl", tmp_path / "in.jsonl", "--model", model_dir("small"), "-n", 2)
    assert_one_error(r, "in.jsonl:2 holds a lone surrogate")


def test_jsonl_lines_keep_their_fields(model_dir, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": "a-1", "prompt": "Hello", "meta": {"k": [1, 2]}}\n"Once"\n')
    r = cli("run", "--jsonl", tmp_path / "in.jsonl", "--model", model_dir("small"), "-n", 2, "-q")
    assert r.returncode == 0, r.stderr
    first, second = map(json.loads, r.stdout.splitlines())
    assert first["id"] == "a-1" and first["meta"] == {"k": [1, 2]} and first["prompt"] == "Hello" and first["index"] == 0
    assert second["prompt"] == "Once" and "id" not in second
    (tmp_path / "clash.jsonl").write_text('{"prompt": "Hello", "text": "mine"}\n')
    assert_one_error(cli("run", "--jsonl", tmp_path / "clash.jsonl", "--model", model_dir("small")), "clash.jsonl:1 has a field 'text'")


def test_score_on_a_nan_checkpoint_is_one_line_without_warnings(model_dir, tmp_path):
    from picogpt_fast.checkpoint import save_pretrained
    from picogpt_fast.config import GPT2Config
    from picogpt_fast.weights import random_weights

    config = GPT2Config.from_file(model_dir("small") / "config.json")
    weights = random_weights(config)
    weights.layers[0].fc_b[3] = np.nan
    save_pretrained(tmp_path / "nan", config, weights, tokenizer_dir=model_dir("small"))
    (tmp_path / "text.txt").write_text("It was the best of times, it was the worst of times.")
    r = cli("score", tmp_path / "text.txt", "--model", tmp_path / "nan", "-q")
    assert_one_error(r, "NaN or infinite")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = GPT2.from_pretrained(tmp_path / "nan")
        with pytest.raises(InvalidArgumentError, match="NaN or infinite logits"):
            model.score("It was the best of times")
