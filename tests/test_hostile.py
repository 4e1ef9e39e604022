"""Odd input and hostile conditions, beyond the fault table (test_faults.py): model files, the
tokenizer, command-line inputs, processes. Each case was found to go wrong once (silently, without
bound, or late and unclear); the server's cases are in test_serve.py, the dataset jobs' in
test_ray.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import textwrap
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from picogpt_fast import GPT2, GPT2Config, Tokenizer, tokenizer
from picogpt_fast.checkpoint import hf_state_dict, save_pretrained
from picogpt_fast.errors import CheckpointError, InvalidArgumentError, ModelNotFoundError
from picogpt_fast.weights import random_weights

from .conftest import PYTHON, SHAPES, child, make_config, subprocess_env


# --------------------------------------------------------------------------- model files
def _sharded(folder, config, weights, tokenizer_dir, shards, weight_map):
    state = hf_state_dict(weights, config)
    save_pretrained(folder, config, weights, tokenizer_dir=tokenizer_dir)
    (folder / "model.safetensors").unlink()
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_tensor_in_two_shards_or_in_a_shard_the_index_does_not_name_is_refused(tmp_path, tokenizer_dir):
    config = make_config("small")
    weights = random_weights(config)
    names = sorted(hf_state_dict(weights, config))
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    dup = names[0]  # in both shards, the index naming the first: which one holds the weights?
    twice = tmp_path / "twice"
    _sharded(
        twice, config, weights, tokenizer_dir, {a: names[::2], b: names[1::2] + [dup]}, {n: (a, b)[i % 2] for i, n in enumerate(names)}
    )
    with pytest.raises(CheckpointError, match=f"'{dup}' is in two shards"):
        GPT2.from_pretrained(twice, backend="numpy")
    elsewhere = tmp_path / "elsewhere"  # the index says a for every tensor but one, which is in b
    _sharded(elsewhere, config, weights, tokenizer_dir, {a: names[1:], b: names[:1]}, {**{n: a for n in names[1:]}, names[0]: a, "x": b})
    with pytest.raises(
        CheckpointError, match=r"is in model-00002-of-00002.safetensors, but model.safetensors.index.json names model-00001"
    ):
        GPT2.from_pretrained(elsewhere, backend="numpy")


@pytest.mark.parametrize("kind", ["loop", "folder", "device", "dangling"])
def test_a_model_file_that_is_not_a_file_is_named_as_such(model_dir, tmp_path, kind):
    folder = tmp_path / "model"
    shutil.copytree(model_dir("small"), folder)
    weights = folder / "model.safetensors"
    weights.unlink()
    if kind == "loop":
        os.symlink("model.safetensors", weights)
    elif kind == "folder":
        os.symlink(tmp_path, weights)
    elif kind == "device":
        os.symlink("/dev/zero", weights)
    else:
        os.symlink(tmp_path / "gone", weights)
    want = {
        "loop": "is a symlink loop",
        "folder": "is a folder, not a file",
        "device": "is not a regular file",
        "dangling": "which does not exist",
    }
    with pytest.raises(ModelNotFoundError, match=want[kind]):
        GPT2.from_pretrained(folder)


def test_a_vocabulary_padded_past_the_tokenizer_never_yields_a_padded_id(tmp_path, tokenizer_dir):
    """nanoGPT pads GPT-2's 50257 rows to 50304. The padded rows here are made to win every step;
    generation and scoring still keep to the tokenizer's ids."""
    config = GPT2Config(**{**SHAPES["small"], "n_vocab": 50304})
    weights = random_weights(config, std=0.25)
    direction = np.ones(config.n_embd, np.float32) / np.sqrt(config.n_embd)
    weights.ln_f_g, weights.ln_f_b = np.full(config.n_embd, 0.01, np.float32), 3 * direction  # every final state ~ 3 x direction
    wte = np.array(weights.wte)
    wte[50257:] = 5 * direction  # so the padded rows' logits (~15) dwarf the others' (~1)
    weights.wte = weights.lm_head = wte
    save_pretrained(tmp_path, config, weights, tokenizer_dir=tokenizer_dir)
    model = GPT2.from_pretrained(tmp_path)
    assert model.forward([1, 2]).argmax(-1).min() >= 50257  # the raw logits: a padded id first
    ids = model.generate("Hello", 12, stop_at_eos=False) + model.generate("Hello", 12, temperature=1.0, seed=3, stop_at_eos=False)
    assert ids and max(ids) < 50257
    text_ids = model.tokenizer.encode("Hello world, again")
    assert np.isfinite(model.score(text_ids)).all()


def test_a_converted_folder_overwritten_or_cut_short_while_loaded_changes_nothing(cli, model_dir, tmp_path):
    """A converted folder is read into memory: writing its file in place afterwards (same inode)
    neither changes the weights nor, when the file is cut short, ends the process with SIGBUS."""
    assert cli("convert", model_dir("small"), "--dtype", "int8", "-o", tmp_path / "int8")[0] == 0
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from picogpt_fast import GPT2
        m = GPT2.from_pretrained({str(tmp_path / "int8")!r})
        before = m.forward([5, 6, 7])
        path = {str(tmp_path / "int8" / "model.safetensors")!r}
        size = os.path.getsize(path)
        with open(path, "r+b") as f:  # in place: the same inode
            f.write(b"\\x7f" * size)
        assert np.array_equal(m.forward([5, 6, 7]), before)
        os.truncate(path, 100)
        assert np.array_equal(m.forward([5, 6, 7]), before)
        print("same")
        """
    )
    r = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "same", r.stderr[-1000:]


# --------------------------------------------------------------------------- the tokenizer
def test_a_merges_file_that_repeats_merges_encodes_as_openai_does_for_long_pieces_too(tokenizer_dir):
    """OpenAI's encoder gives a repeated merge its last rank; the heap path for long pieces assumes
    every merge appears once, so with repeats every piece takes OpenAI's loop."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    lines = (tokenizer_dir / "merges.txt").read_text().splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    doubled = Tokenizer(vocab, merges + merges[:20000])  # a file concatenated (in part) twice
    ranks = {pair: rank for rank, pair in enumerate(merges + merges[:20000])}
    rng = np.random.default_rng(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(list(letters), n)) for n in (60, 120, 400)] + ["ab" * 80, "the" * 40]
    for word in words:
        symbols = word.encode().decode("latin-1").translate(doubled._byte_alphabet)
        want = [vocab[t] for t in tokenizer._merge(symbols, ranks)]
        assert doubled.encode(word) == want


def test_the_tokenizer_remembers_only_short_pieces(tokenizer_dir):
    tok = Tokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    for i in range(5):
        tok.encode("x" * (100_000 + i) + " short words here")
    assert tok._cache and max(map(len, tok._cache)) <= tokenizer._CACHE_PIECE


# --------------------------------------------------------------------------- the Python API
def test_a_boolean_among_token_ids_is_refused(models):
    eng, _ = models("small")
    for ids in ([1, True, 3], (True,), [np.bool_(False), 2]):
        with pytest.raises(InvalidArgumentError, match="boolean"):
            eng.generate(ids, 2)
    with pytest.raises(InvalidArgumentError, match="boolean"):
        eng.session(1, 8).prefill([5, True])


def test_logprobs_are_bounded(models, cli, model_dir):
    eng, _ = models("small")
    with pytest.raises(InvalidArgumentError, match="logprobs=21 is invalid: must be between 0 and 20"):
        eng.generate("Hi", 2, logprobs=21)
    code, _, err = cli("run", "Hi", "--model", model_dir("small"), "--json", "--logprobs", "50000")
    assert code == 1 and "--logprobs=50000 is invalid" in err and len(err.strip().splitlines()) == 1


def test_a_model_cannot_be_pickled_and_says_why(models):
    eng, _ = models("small")
    with pytest.raises(InvalidArgumentError, match="cannot be pickled.*from_pretrained.*spawn"):
        pickle.dumps(eng)


def test_a_child_forked_after_the_engine_ran_is_refused_in_one_line(model_dir):
    """OpenMP aborts a forked child that starts threads; the engine refuses first, naming 'spawn'
    (the child exits 3 when it got the error, where the abort would kill it)."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from picogpt_fast import GPT2
        from picogpt_fast.errors import ConcurrencyError
        m = GPT2.from_pretrained({str(model_dir("small"))!r})
        m.generate("Hello", 2)
        pid = os.fork()
        if pid == 0:
            try:
                m.generate("Hello", 2)
            except ConcurrencyError as e:
                print(e, flush=True)
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        m.generate("Hello", 2)  # the parent goes on
        """
    )
    r = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-1000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "child 3" and "'spawn'" in lines[0], r.stdout


# --------------------------------------------------------------------------- the command line's inputs
def test_prompt_lines_split_on_newlines_only(cli, model_dir, tmp_path):
    """U+2028, U+2029, U+0085, form feed, vertical tab and \\x1c-\\x1e are characters of a prompt;
    only \\n (with an optional \\r before it) ends a line. Raw U+2028 is legal inside JSON strings."""
    odd = "\u2028\u2029\u0085\x0c\x0b\x1c\x1d\x1e"
    (tmp_path / "p.txt").write_text(f"a{odd}b\r\nsecond{odd}\nthird", encoding="utf-8")
    code, out, err = cli("run", "--file", tmp_path / "p.txt", "--model", model_dir("small"), "-n", 1, "--json", "-q")
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.split("\n") if line] == [f"a{odd}b", f"second{odd}", "third"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x\u2028y", "id": 1}, ensure_ascii=False) + "\n", encoding="utf-8")
    code, out, err = cli("run", "--jsonl", tmp_path / "p.jsonl", "--model", model_dir("small"), "-n", 1, "-q")
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.split("\n") if line]
    assert record["prompt"] == "x\u2028y" and record["id"] == 1


@pytest.mark.parametrize("command", [["run", "--file", "/dev/zero"], ["run", "--jsonl", "/dev/zero"], ["score", "/dev/zero"]])
def test_an_endless_input_file_is_one_error_line_not_a_growing_process(model_dir, command):
    t0 = time.perf_counter()
    r = subprocess.run(
        [PYTHON, "-m", "picogpt_fast", *command, "--model", str(model_dir("small"))],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "MiB" in r.stderr, r.stderr[-500:]
    assert time.perf_counter() - t0 < 60


def test_prompt_files_are_generated_as_they_are_read(model_dir):
    """`run --file -` on a pipe: the first batch's results come out while the input is still open,
    so the input's length does not bound the memory or delay the first results."""
    args = [PYTHON, "-m", "picogpt_fast", "run", "--file", "-", "--model", str(model_dir("small")), "-n", "2", "-q"]
    with child(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env()) as p:
        p.stdin.write(b"".join(f"prompt {i}\n".encode() for i in range(16)))
        p.stdin.flush()
        first = p.stdout.readline()  # before stdin is closed
        assert first, p.stderr.read().decode()[-500:]
        p.stdin.write(b"one more\n")
        p.stdin.close()
        rest = p.stdout.read().splitlines()
        assert p.wait(timeout=120) == 0
    assert len(rest) == 16


def test_run_dash_reads_the_prompt_from_stdin(model_dir):
    r = subprocess.run(
        [PYTHON, "-m", "picogpt_fast", "run", "-", "--model", str(model_dir("small")), "-n", "3", "--json", "-q"],
        input="Once upon a time\n",
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt"] == "Once upon a time"


# --------------------------------------------------------------------------- the weights cache
def test_hidden_leftovers_of_interrupted_writes_are_listed_and_cleared(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOGPT_FAST_CACHE", str(tmp_path))
    (tmp_path / ".tmpa1B2c3").write_bytes(b"\0" * 5000)  # an earlier release's writer (safetensors')
    (tmp_path / ".0123abcd-int8.safetensors.777.tmp").write_bytes(b"\0" * 3000)  # this one's
    code, out, _ = cli("cache")
    assert code == 0 and out.count("(an interrupted write)") == 2 and "2 entries" in out
    code, _, err = cli("cache", "clear")
    assert code == 0 and "removed 2 entries" in err
    assert not list(tmp_path.iterdir())
