"""The command line: what goes to stdout and stderr, exit codes, picoGPT's option names, errors."""

import json
import os
import re
import shutil
import signal
import subprocess

import pytest

from picogpt_fast import GPT2

from .conftest import PYTHON, child, subprocess_env

PROMPT = "Alan Turing theorized that computers would one day become"


def test_run_prints_only_the_continuation(cli, model_dir, models):
    eng, _ = models("small")
    code, out, err = cli("run", PROMPT, "--model", model_dir("small"), "-n", 8)
    assert code == 0, err
    completions, _ = eng.complete([PROMPT], 8)
    assert out == completions[0].text + "\n"
    assert "prefill:" in err and "decode:" in err and "loaded" in err
    code, echoed, _ = cli("run", PROMPT, "--model", model_dir("small"), "-n", 8, "--echo", "-q")
    assert echoed == PROMPT + out


def test_picogpt_option_names(cli, model_dir, tmp_path):
    folder = model_dir("small")
    (tmp_path / "124M").symlink_to(folder)
    a = cli("run", PROMPT, "--n_tokens_to_generate", 6, "--model_size", "124M", "--models_dir", tmp_path, "-q")
    b = cli("run", PROMPT, "-n", 6, "--model", folder, "-q")
    c = cli("run", PROMPT, "--n_tokens_to_generate=6", f"--model_size={folder}", "-q")
    assert a[0] == 0 and a[1] == b[1] == c[1]


def test_json_output(cli, model_dir):
    code, out, err = cli("run", "", "--model", model_dir("small"), "-n", 5, "--json", "--logprobs", 2, "--ignore-eos")
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt_ids"] == [50256]  # an empty prompt starts from <|endoftext|>
    assert len(r["ids"]) == 5 and r["stop_reason"] == "length"
    assert set(r["timings"]) >= {"prefill_ms", "decode_tok_s"}
    assert len(r["logprobs"]) == 5 and len(r["logprobs"][0]["top"]) == 2


def test_sampling_options_and_seed(cli, model_dir):
    args = ("run", "Once", "--model", model_dir("small"), "-n", 12, "-q", "--ignore-eos", "--temperature", 1.0, "--top-p", 0.9)
    a, b, c = cli(*args, "--seed", 1), cli(*args, "--seed", 1), cli(*args, "--seed", 2)
    assert a[0] == 0 and a[1] == b[1] and a[1] != c[1]


def test_stream_prints_what_run_prints(model_dir):
    args = [PYTHON, "-m", "picogpt_fast", "run", "Hello", "--model", str(model_dir("small")), "-n", 20, "-q", "--stop", " the"]
    args = [str(a) for a in args]
    plain = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    streamed = subprocess.run(args + ["--stream"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert plain.returncode == streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout


def test_ctrl_c_while_streaming(model_dir):
    args = [
        PYTHON,
        "-m",
        "picogpt_fast",
        "run",
        "Hello",
        "--model",
        str(model_dir("small")),
        "-n",
        "100000",
        "--clip",
        "--stream",
        "--ignore-eos",
        "--backend",
        "numpy",
    ]
    with child(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()) as p:
        first = p.stdout.read(1)  # generation has started
        assert first
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert "Traceback" not in err


def test_batch_file_and_jsonl(cli, model_dir, tmp_path, models):
    eng, _ = models("small")
    prompts = ["Hello", "The weather today", "One two three"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n", encoding="utf-8")
    code, out, err = cli("run", "--file", tmp_path / "p.txt", "--model", model_dir("small"), "-n", 6, "-q", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    code, out2, err = cli("run", "--jsonl", tmp_path / "p.jsonl", "--model", model_dir("small"), "-n", 6, "-q")
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out2.splitlines()] == [r["text"] for r in rows]
    assert [r["ids"] for r in rows] == [eng.generate(p, 6) for p in prompts]


def test_context_refused_before_loading_weights(cli, model_dir, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in os.listdir(model_dir("small")):
        (folder / f).symlink_to(model_dir("small") / f)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(b"corrupt")  # loading it would fail differently
    code, out, err = cli("run", PROMPT, "--model", folder, "-n", 200)
    assert code == 1 and out == ""
    assert err.strip() == (
        "error: prompt of 10 tokens + 200 new tokens = 210 exceeds the model's context of 128; use at most 118 new tokens (or --clip)"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("--temperature", "-1"), "temperature=-1.0 is invalid"),
        (("--top-p", "0"), "top_p=0.0 is invalid"),
        (("--top-k", "-2"), "top_k=-2 is invalid"),
        (("--min-p", "3"), "min_p=3.0 is invalid"),
        (("--repetition-penalty", "0"), "repetition_penalty=0.0 is invalid"),
        (("-n", "-5"), "max_new_tokens=-5"),
        (("--threads", "64"), "threads=64"),
        (("--top-p", "abc"), "'abc' is not a valid float"),
        (("--no-such-option",), "No such option"),
        (("--stream", "--json"), "--stream prints plain text"),
        (("--logprobs", "3"), "--logprobs needs --json"),
    ],
)
def test_bad_values_are_one_line(cli, model_dir, args, message):
    code, out, err = cli("run", "hi", "--model", model_dir("small"), *args)
    assert code in (1, 2) and out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_model_is_one_line(cli):
    code, _, err = cli("run", "hi", "--model", "./missing-folder")
    assert code == 1 and "neither an existing folder nor a Hub id" in err and len(err.strip().splitlines()) == 1


def test_tokenize(cli, tokenizer_dir):
    assert cli("tokenize", "Hello world", "--model", tokenizer_dir)[1] == "15496 995\n"
    assert cli("tokenize", "--decode", "15496, 995", "--model", tokenizer_dir)[1] == "Hello world\n"
    assert cli("tokenize", "<|endoftext|>", "--model", tokenizer_dir)[1] == "27 91 437 1659 5239 91 29\n"
    assert cli("tokenize", "<|endoftext|>", "--allow-special", "--json", "--model", tokenizer_dir)[1] == "[50256]\n"
    code, _, err = cli("tokenize", "--decode", "1 x", "--model", tokenizer_dir)
    assert code == 1 and "--decode takes token ids" in err


def test_version_and_help(cli):
    from picogpt_fast import __version__

    assert cli("--version")[1].strip().endswith(__version__)
    code, out, _ = cli("--help")
    assert code == 0 and "Examples:" in out and "picogpt-fast run" in out
    code, out, _ = cli("run", "--help")
    assert code == 0 and "--n_tokens_to_generate" in out


def test_bench_report(cli, model_dir):
    code, out, err = cli("bench", "--model", model_dir("small"), "--prompt", "4,20", "--gen", 3, "--batch", "2", "--reps", 2, "--json")
    assert code == 0, err
    r = json.loads(out)
    tests = {(row["test"], row["backend"]) for row in r["rows"]}
    assert {("pp4", "numba"), ("pp20", "numba"), ("tg3", "numba"), ("tg3 x2", "numba"), ("pp4", "numpy"), ("tg3", "numpy")} <= tests
    decode = next(row for row in r["rows"] if row["test"] == "tg3")
    assert decode["tok_s"] > 0 and decode["bandwidth_fraction"] > 0 and decode["reps"] == 2
    batch = next(row for row in r["rows"] if row["test"] == "tg3 x2")
    assert batch["batch"] == 2 and batch["tokens"] == 6 and batch["vs_one_sequence"] > 0
    ttft = next(row for row in r["rows"] if row["test"].startswith("ttft") and row["backend"] == "numba")
    assert ttft["tok_s"] is None and ttft["median_ms"] > 0  # a time, in its own unit
    assert r["bandwidth_gb_s"] > 0 and r["bandwidth_after_gb_s"] > 0 and "contiguous range per thread" in r["probe"]
    assert r["peak_rss_bytes"] > 0 and r["machine"]["threading_layer"]
    assert "picogpt-fast bench: float32 tg3 x2 (2 reps)" in err  # progress, on stderr
    code, out, _ = cli("bench", "--model", model_dir("small"), "--prompt", "4", "--gen", 2, "--reps", 1, "--no-reference")
    assert code == 0 and "| pp4 | numba |" in out and "numpy" not in out.split("| test |")[1]
    ttft_row = next(line for line in out.splitlines() if line.startswith("| ttft"))
    assert ttft_row.split("|")[4].strip() == "" and float(ttft_row.split("|")[6]) > 0  # no tok/s: milliseconds
    code, _, err = cli("bench", "--model", model_dir("small"), "--prompt", "500")
    assert code == 1 and "must fit the context" in err


def test_warmup_says_whether_it_compiled(tmp_path, model_dir):
    """On an empty kernel cache warmup compiles, then it only loads; a run on an empty cache says it
    is compiling, once, and its prefill time leaves the compiling out."""
    env = subprocess_env(NUMBA_CACHE_DIR=str(tmp_path))
    run = lambda *a: subprocess.run([PYTHON, "-m", "picogpt_fast", *map(str, a)], capture_output=True, text=True, env=env, timeout=900)  # noqa: E731
    first = run("warmup")
    assert first.returncode == 0 and first.stdout.startswith("compiled ") and "threading layer" in first.stdout, first.stderr
    second = run("warmup")
    assert second.stdout.startswith("loaded ") and "nothing to compile" in second.stdout
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "fresh")
    r = run("run", "Hello", "--model", model_dir("small"), "-n", 3)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("compiling the engine's float32 kernels") == 1
    prefill_ms = float(re.search(r"prefill: \d+ tokens? in ([\d.]+) ms", r.stderr).group(1))
    assert prefill_ms < 1000  # the compiling (seconds) happened before


def run_bytes(args, stdin=b"", **env):
    """The CLI in a subprocess with raw bytes as arguments and stdin."""
    cmd = [PYTHON.encode(), b"-m", b"picogpt_fast", *(a if isinstance(a, bytes) else str(a).encode() for a in args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=subprocess_env(**env), timeout=300)


def test_arguments_that_are_not_utf8(model_dir):
    r = run_bytes([b"run", b"caf\xe9", b"--model", model_dir("small"), b"-n", b"2"])
    assert r.returncode == 1 and r.stderr.decode().strip() == "error: PROMPT is not UTF-8 text (byte 0xe9 at offset 3); pass UTF-8"
    r = run_bytes([b"tokenize", b"\xff", b"--model", model_dir("small")])
    assert r.returncode == 1 and b"TEXT is not UTF-8" in r.stderr and b"Traceback" not in r.stderr


def test_prompt_piped_on_stdin(model_dir, models):
    eng, _ = models("small")
    r = run_bytes(["run", "--model", model_dir("small"), "-n", 5, "-q"], stdin=b"The weather today\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == eng.complete(["The weather today"], 5)[0][0].text + "\n"
    r = run_bytes(["run", "--file", "-", "--model", model_dir("small"), "-n", 3, "-q", "--json"], stdin=b"A\nB\n")
    assert [json.loads(line)["prompt"] for line in r.stdout.decode().splitlines()] == ["A", "B"]
    r = run_bytes(["run", "--model", model_dir("small"), "-n", 3], stdin=b"\xff\xfe")
    assert r.returncode == 1 and b"stdin is not UTF-8" in r.stderr


def test_output_whatever_stdouts_encoding(model_dir):
    """An ASCII stdout (PYTHONIOENCODING=ascii): text is printed (replaced where ASCII cannot hold it),
    JSON with escapes, never an encoding error."""
    for mode in ([], ["--stream"]):
        r = run_bytes(["run", "café ☕", "--echo", "--model", model_dir("small"), "-n", 4, "-q", *mode], PYTHONIOENCODING="ascii")
        assert r.returncode == 0 and r.stdout.startswith((b"caf? ?", "café ☕".encode())), r.stderr  # replaced, or UTF-8 bytes
    r = run_bytes(["run", "café ☕", "--model", model_dir("small"), "-n", 2, "-q", "--json"], PYTHONIOENCODING="ascii")
    assert r.returncode == 0 and json.loads(r.stdout)["prompt"] == "café ☕"


def test_missing_models_dir(cli, model_dir, tmp_path):
    code, _, err = cli("run", "hi", "--model_size", "124M", "--models_dir", tmp_path / "nope")
    assert code == 1 and "--models_dir" in err and "is not a folder" in err


def test_python_api_checks_its_arguments(models):
    from picogpt_fast.errors import InvalidArgumentError

    eng, _ = models("small")
    with pytest.raises(InvalidArgumentError, match="list of prompts"):
        eng.generate_batch("Hello", 1)
    with pytest.raises(InvalidArgumentError, match="integer token ids"):
        eng.generate([1.0, 2.0], 1)
    with pytest.raises(InvalidArgumentError, match="unknown keyword argument 'temprature'; did you mean 'temperature'"):
        eng.generate("Hi", 2, temprature=0.5)
    text = eng.complete(["Hello"], 12, stop="xyz", stop_at_eos=False)[0][0].text
    assert text == eng.complete(["Hello"], 12, stop=["xyz"], stop_at_eos=False)[0][0].text  # one stop string, not three


def test_cache_lists_and_clears_what_is_cached(cli, model_dir, tmp_path, monkeypatch):
    from picogpt_fast import GPT2

    monkeypatch.setenv("PICOGPT_FAST_CACHE", str(tmp_path))
    small, odd = model_dir("small"), model_dir("odd")
    for folder, dtype in ((small, "int8"), (small, "float16"), (odd, "int8")):
        GPT2.from_pretrained(folder, dtype=dtype)
    code, out, _ = cli("cache")
    assert code == 0 and out.splitlines()[0].split() == ["SOURCE", "DTYPE", "SIZE", "LAST", "USED"]
    assert out.count(str(small)) == 2 and out.count(str(odd)) == 1 and "3 entries" in out and "just now" in out
    code, out, err = cli("cache", "clear", small, "--dtype", "int8")
    assert code == 0 and "removed 1 entry" in err
    rows = [json.loads(line) for line in cli("cache", "list", "--json")[1].splitlines()]
    assert sorted((r["source"], r["dtype"]) for r in rows) == sorted([(str(small), "float16"), (str(odd), "int8")])
    gone = tmp_path / "gone"  # a model folder deleted after its conversion: cleared by the source `cache` lists
    shutil.copytree(odd, gone)
    GPT2.from_pretrained(gone, dtype="float16")
    shutil.rmtree(gone)
    code, out, err = cli("cache", "clear", str(gone))
    assert code == 0 and "removed 1 entry" in err
    code, out, err = cli("cache", "clear")
    assert code == 0 and "removed 2 entries" in err and "0 entries" in cli("cache")[1]


def test_the_help_shows_each_command_s_summary_whole(cli):
    code, out, _ = cli("--help")
    assert code == 0
    commands = out.split("Commands:")[1].split("Examples:")[0]
    for name in ("run", "tokenize", "score", "dataset", "convert", "cache", "warmup", "bench", "serve"):
        line = next(line for line in commands.splitlines() if line.strip().startswith(name + " "))
        assert not line.rstrip().endswith("..."), line


def test_the_default_model_comes_from_the_environment(cli, model_dir, monkeypatch):
    monkeypatch.setenv("PICOGPT_FAST_MODEL", str(model_dir("small")))
    code, out, err = cli("run", "Hello", "-n", 3, "-q")
    assert code == 0, err
    assert (
        out
        == GPT2.from_pretrained(model_dir("small")).tokenizer.decode(GPT2.from_pretrained(model_dir("small")).generate("Hello", 3)) + "\n"
    )
    assert cli("tokenize", "Hello world")[1] == "15496 995\n"
