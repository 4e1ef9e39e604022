"""Datasets with Ray Data (picogpt_fast.ray and `--dataset`): on a local Ray instance of 2 CPUs with
2 actors, results bitwise the single-process engine's, every row once with its own columns, malformed
rows recorded, a killed actor replaced, Parquet and JSONL round trips, bad options refused early."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")  # CI installs it: these run there
pq = pytest.importorskip("pyarrow.parquet")

from picogpt_fast import GPT2  # noqa: E402
from picogpt_fast.ray import generate_dataset, score_dataset  # noqa: E402

TEXTS = [
    "Alan Turing theorized that computers would one day become",
    "Once upon a time",
    "Hello world, hello world.",
    "Ünïcödé ☃ and emoji 🙂 in a row",
    "def f(x):\n    return x * 2\n",
    "A" * 300,
    "The the the the the",
]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs for the whole module, as CI runs it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(model_dir):
    return model_dir("small", seed=5, std=0.25, n_ctx=256)


@pytest.fixture(scope="module")
def model(folder):
    return GPT2.from_pretrained(folder)


def rows(n: int) -> list[dict]:
    return [{"id": i, "doc": f"doc-{i}", "text": TEXTS[i % len(TEXTS)] + f" row {i}" * (i % 4)} for i in range(n)]


def nll(model, text) -> float:
    lp = model.score(text)
    return float(-lp[~np.isnan(lp)].mean())


def test_scores_are_the_single_process_engine_s_whatever_the_batching(local_ray, folder, model):
    data = rows(40)
    for batch_size in (1, 7):
        out = score_dataset(ray.data.from_items(data), str(folder), actors=2, batch_size=batch_size).take_all()
        assert sorted(r["id"] for r in out) == list(range(40))  # every row once
        for r in out:
            row = data[r["id"]]
            assert (r["doc"], r["text"]) == (row["doc"], row["text"])  # input columns kept
            assert r["error"] is None
            assert r["tokens"] == len(model.tokenizer.encode(row["text"]))
            assert r["nll"] == nll(model, row["text"])  # bitwise
            assert r["perplexity"] == math.exp(r["nll"])


def test_reads_that_need_a_cpu_still_run_beside_the_actors(local_ray, folder, model, tmp_path):
    """Ray's readers ask for a CPU per task; a pool holding every CPU from the start would wait forever."""
    data = rows(12)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    ds = ray.data.read_json(str(tmp_path / "in.jsonl"))  # Ray's defaults: one CPU per read task
    out = score_dataset(ds, str(folder), batch_size=2).take_all()  # default pool: as many actors as CPUs
    assert sorted(r["id"] for r in out) == list(range(12))
    assert all(r["nll"] == nll(model, data[r["id"]]["text"]) for r in out)


def test_long_text_is_scored_in_windows_like_score(local_ray, folder, model):
    text = " ".join(TEXTS) * 12  # several contexts long
    assert len(model.tokenizer.encode(text)) > 2 * model.config.n_ctx
    (r,) = score_dataset(ray.data.from_items([{"text": text}]), str(folder), actors=1, stride=100).take_all()
    lp = model.score(text, stride=100)
    assert r["nll"] == float(-lp[~np.isnan(lp)].mean())


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}])
def test_generations_are_the_single_process_engine_s(local_ray, folder, model, sampling):
    prompts = [{"key": i, "prompt": TEXTS[i % len(TEXTS)][: 10 + i]} for i in range(24)]
    out = generate_dataset(ray.data.from_items(prompts), str(folder), max_new_tokens=12, actors=2, batch_size=5, **sampling).take_all()
    assert sorted(r["key"] for r in out) == list(range(24))
    for r in out:
        (expect,), _ = model.complete([r["prompt"]], 12, **sampling)
        assert (r["ids"], r["text"], r["stop_reason"], r["error"]) == (expect.ids, expect.text, expect.stop_reason, None)


def test_malformed_rows_are_recorded_and_the_job_goes_on(local_ray, folder, model):
    data = [{"id": 0, "text": "fine text here"}, {"id": 1, "text": None}, {"id": 2, "text": "x"}, {"id": 3, "text": "also fine"}]
    out = {r["id"]: r for r in score_dataset(ray.data.from_items(data), str(folder), actors=1).take_all()}
    assert out[0]["error"] is None and out[3]["nll"] == nll(model, "also fine")
    assert out[1]["error"] == "the row holds no text (null)" and out[1]["nll"] is None
    assert "needs at least 2" in out[2]["error"] and out[2]["tokens"] == 1
    out = score_dataset(ray.data.from_items([{"text": 5}, {"text": 7}]), str(folder), actors=1).take_all()
    assert [r["error"] for r in out] == ["the row is not text (int)"] * 2  # a column of numbers
    prompts = [{"prompt": "short"}, {"prompt": " word" * 300}, {"prompt": None}]
    out = generate_dataset(ray.data.from_items(prompts), str(folder), max_new_tokens=5, actors=1).take_all()
    by_error = sorted((r["error"] or "") for r in out)
    assert by_error[0] == "" and "the model's context is 256" in by_error[1] and "no text (null)" in by_error[2]
    ok = next(r for r in out if r["error"] is None)
    assert ok["ids"] == model.generate("short", 5)


def test_a_killed_actor_is_replaced_and_its_rows_retried(local_ray, folder, model):
    data = [{"id": i, "text": TEXTS[i % len(TEXTS)] * 4} for i in range(400)]
    ds = score_dataset(ray.data.from_items(data), str(folder), actors=2, batch_size=4)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(rows=ds.take_all()))
    job.start()
    killed, deadline = None, time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and job.is_alive():
        alive = _actor_pids("_Scorer")
        if len(alive) == 2:
            time.sleep(1.0)  # mid-job: both actors are working
            os.kill(alive[0], signal.SIGKILL)
            killed = alive[0]
        time.sleep(0.05)
    job.join(timeout=600)
    assert killed is not None, "the job ended before an actor could be killed"
    out = result["rows"]
    assert sorted(r["id"] for r in out) == list(range(400))  # all there, none twice
    for r in out[::37]:
        assert r["nll"] == nll(model, r["text"])


def _actor_pids(name: str) -> list[int]:
    """Processes of Ray Data's actors of this class (titled "ray::MapWorker(MapBatches(Class))...")."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(f"ray::MapWorker(MapBatches({name}))".encode()):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return sorted(pids)


def test_options_are_checked_before_any_work(local_ray, folder):
    ds = ray.data.from_items([{"text": "hi there"}])
    with pytest.raises(Exception, match="no column 'body'"):
        score_dataset(ds, str(folder), column="body")
    with pytest.raises(Exception, match="already has a column 'nll'"):
        score_dataset(ray.data.from_items([{"text": "a b", "nll": 1.0}]), str(folder))
    with pytest.raises(Exception, match="actors"):
        score_dataset(ds, str(folder), actors=0)
    with pytest.raises(Exception, match="cpus_per_actor"):
        score_dataset(ds, str(folder), cpus_per_actor=0)
    with pytest.raises(Exception, match="temperature"):
        generate_dataset(ray.data.from_items([{"prompt": "a"}]), str(folder), temperature=-1)
    with pytest.raises(Exception, match="max_new_tokens"):
        generate_dataset(ray.data.from_items([{"prompt": "a"}]), str(folder), max_new_tokens=257)
    with pytest.raises(Exception, match="neither an existing folder nor a Hub id"):
        score_dataset(ds, str(folder / "missing"))


# --------------------------------------------------------------------------- the commands
def test_score_command_parquet_round_trip(local_ray, folder, model, tmp_path, cli):
    import pyarrow as pa

    data = rows(30)
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "in.parquet")
    code, out, err = cli(
        "score", "--model", folder, "--dataset", tmp_path / "in.parquet", "--out", tmp_path / "out.parquet", "--actors", "2"
    )
    assert code == 0, err
    assert out == "" and "wrote 30 rows" in err
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", "doc", "text", "tokens", "nll", "perplexity", "error"]
    for r in table.to_pylist():
        assert r["nll"] == nll(model, data[r["id"]]["text"]) and r["doc"] == f"doc-{r['id']}"


def test_run_command_jsonl_round_trip(local_ray, folder, model, tmp_path, cli):
    lines = [{"n": i, "prompt": TEXTS[i % len(TEXTS)][:20]} for i in range(12)] + [{"n": 12, "prompt": None}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    code, _, err = cli(
        "run",
        "--model",
        folder,
        "--dataset",
        tmp_path / "in.jsonl",
        "--out",
        tmp_path / "out.jsonl",
        "-n",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--batch-size",
        "5",
    )
    assert code == 0, err
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["n"] for r in out) == list(range(13))
    for r in out:
        if r["prompt"] is None:
            assert r["error"] == "the row holds no text (null)" and r["ids"] is None
            continue
        assert r["ids"] == model.generate(r["prompt"], 6, temperature=0.8, seed=3)
        assert r["text"] == model.tokenizer.decode(r["ids"]) and r["stop_reason"] == "length"


def test_run_command_csv_out_writes_ids_as_json(local_ray, folder, model, tmp_path, cli):
    import csv

    (tmp_path / "in.csv").write_text('key,prompt\n1,Once upon a time\n2,"Hello, world"\n', encoding="utf-8")
    code, _, err = cli("run", "--model", folder, "--dataset", tmp_path / "in.csv", "--out", tmp_path / "out.csv", "-n", "4")
    assert code == 0, err
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        out = {int(r["key"]): r for r in csv.DictReader(f)}
    assert sorted(out) == [1, 2]
    for r in out.values():
        assert json.loads(r["ids"]) == model.generate(r["prompt"], 4) and r["text"] == model.tokenizer.decode(json.loads(r["ids"]))


def test_score_command_folder_in_folder_out(local_ray, folder, model, tmp_path, cli):
    """A folder of JSONL files in, a folder of Parquet files out (as a cluster job writes them)."""
    data = rows(20)
    (tmp_path / "in").mkdir()
    for part in range(3):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data[part::3])
        (tmp_path / "in" / f"part-{part}.jsonl").write_text(lines, encoding="utf-8")
    code, _, err = cli("score", "--model", folder, "--dataset", tmp_path / "in", "--out", tmp_path / "out", "--batch-size", "3")
    assert code == 0, err
    table = pq.read_table(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == list(range(20))
    for r in table.to_pylist():
        assert r["nll"] == nll(model, data[r["id"]]["text"])
    code, _, err = cli("score", "--model", folder, "--dataset", tmp_path / "in", "--out", tmp_path / "out")
    assert code != 0 and "not empty" in err  # never mixed into an earlier job's output


@pytest.mark.parametrize(
    "args, words",
    [
        (["score", "--dataset", "{tmp}/nope.parquet", "--out", "{tmp}/o.parquet"], "does not exist"),
        (["dataset", "score", "--dataset", "{tmp}/nope.parquet", "--out", "{tmp}/o.parquet"], "does not exist"),
        (["score", "--dataset", "{tmp}/in.txt", "--out", "{tmp}/o.parquet"], "cannot tell the format"),
        (["score", "--dataset", "{tmp}/in.jsonl"], "Missing option '--out'"),
        (["score", "--out", "{tmp}/o.parquet"], ("No such option", "--out")),
        (["score", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/o.parquet", "--actors", "0"], "actors"),
        (["score", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/o.parquet", "--against", "float32"], ("No such option", "--against")),
        (["score", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/o.parquet", "--threads", "2"], ("No such option", "--threads")),
        (["score", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/missing/o.parquet"], "does not exist"),
        (["score", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/o.parquet", "--column", "body"], "has no column 'body'"),
        (["score", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/o.parquet", "--stride", "0"], "stride=0 is invalid"),
        (["score", "{tmp}/in.txt", "--actors", "2"], ("No such option", "--actors")),
        (["run", "Hello", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/o.jsonl"], "unexpected extra argument (Hello)"),
        (["run", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/o.jsonl", "-n", "300"], "--max-new-tokens"),
        (["run", "--dataset", "{tmp}/in.jsonl", "--out", "{tmp}/o.jsonl", "--top-p", "0"], "top_p"),
    ],
)
def test_bad_dataset_options_fail_in_one_line(folder, tmp_path, cli, args, words):
    (tmp_path / "in.jsonl").write_text('{"text": "a b c", "prompt": "a"}\n')
    (tmp_path / "in.txt").write_text("a b c")
    code, out, err = cli(*[a.format(tmp=tmp_path) for a in args], "--model", folder)
    words = (words,) if isinstance(words, str) else words  # click's wording of an unknown option varies by version
    assert code != 0 and all(w in err for w in words) and err.count("\n") == 1, err
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.jsonl").exists()


# --------------------------------------------------------------------------- nothing lost, nothing silently wrong
def test_every_bad_value_a_jsonl_row_can_hold_is_that_row_s_error(local_ray, folder, model, tmp_path, cli):
    """A number, a list, null, a lone surrogate, a line that is no JSON object, invalid JSON: each is
    its row's error, the other rows are scored, and the job succeeds."""
    lines = [
        '{"k": 0, "text": "Hello world"}',
        '{"k": 1, "text": 5}',
        '{"k": 2, "text": ["a"]}',
        '{"k": 3, "text": null}',
        '{"k": 4, "text": "bad \\ud800 surrogate"}',
        "[1, 2]",
        "not json",
        '{"k": 7, "text": "Once upon a time"}',
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = cli("score", "--model", folder, "--dataset", tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--batch-size", "3")
    assert code == 0, err
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(out) == len(lines)
    errors = sorted(r["error"] for r in out if r["error"])
    assert errors == sorted(
        [
            "the row is not text (int)",
            "the row is not text (list)",
            "the row holds no text (null)",
            "the text holds a lone surrogate (U+D800), which is not valid Unicode",
            "the line is a JSON list, not an object",
            "the line is not valid JSON (Expecting value: line 1 column 1 (char 0))",
        ]
    )
    good = {r["k"]: r for r in out if not r["error"]}
    assert good[0]["nll"] == nll(model, "Hello world") and good[7]["nll"] == nll(model, "Once upon a time")


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(folder, tmp_path, cli):
    data = tmp_path / "in" / "part-0.jsonl"
    data.parent.mkdir()
    data.write_text('{"text": "a b c"}\n')
    for source, out in ((data, data), (data.parent, data.parent / "scored.jsonl")):  # the file itself, a file in the input folder
        code, _, err = cli("score", "--model", folder, "--dataset", source, "--out", out)
        assert code != 0 and "is the input" in err and err.count("\n") == 1, err
    assert data.read_text() == '{"text": "a b c"}\n' and not (data.parent / "scored.jsonl").exists()
    code, _, err = cli("score", "--model", folder, "--dataset", data, "--out", tmp_path / "x.jsonl", "--column", "body")
    assert code != 0 and "has no column 'body'" in err and err.count("\n") == 1, err  # found before Ray starts


def test_a_failed_job_leaves_an_existing_output_as_it_was(local_ray, folder, tmp_path, cli):
    """The actors find the checkpoint corrupt (the driver reads only its config and tokenizer): one
    error line, and the output file the job would have replaced keeps its old content."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "in.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "out.jsonl").write_text("the user's earlier results\n")
    code, out, err = cli("score", "--model", broken, "--dataset", tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl")
    assert code == 1 and out == "" and err.count("\n") == 1 and "the dataset job failed" in err and "truncated" in err, err
    assert (tmp_path / "out.jsonl").read_text() == "the user's earlier results\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl")]  # no temporary file left


def test_ray_keeps_its_logs_to_itself(folder, tmp_path):
    """A job in its own process, its own Ray: the terminal shows the job's one line, not Ray's logs."""
    import subprocess

    from .conftest import PYTHON, subprocess_env

    (tmp_path / "in.jsonl").write_text('{"text": "a b c"}\n{"text": "Hello world"}\n')
    cmd = [
        PYTHON,
        "-m",
        "picogpt_fast",
        "score",
        "--model",
        str(folder),
        "--dataset",
        str(tmp_path / "in.jsonl"),
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("wrote 2 rows"), r.stderr[-3000:]


# --------------------------------------------------------------------------- odd input, bounded failure
def test_csv_values_stay_text_and_the_rows_keep_the_input_s_order(local_ray, folder, model, tmp_path, cli):
    """Arrow would read the zip code "00123" as 123 and a column of number-like text as numbers."""
    lines = ["id,zip,text"] + [f"{i},{i:05d},{1000 + i}.25" for i in range(30)]  # text of several tokens
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = cli(
        "dataset", "score", "--model", folder, "--dataset", tmp_path / "in.csv", "--out", tmp_path / "out.jsonl", "--batch-size", "2"
    )
    assert code == 0, err
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [str(i) for i in range(30)]  # the input's order
    assert [r["zip"] for r in out] == [f"{i:05d}" for i in range(30)]
    assert [r["text"] for r in out] == [f"{1000 + i}.25" for i in range(30)]
    assert all(r["error"] is None and r["nll"] == nll(model, r["text"]) for r in out)


def test_a_csv_output_has_every_column_from_its_first_row(local_ray, folder, tmp_path, cli):
    """JSON lines whose later rows bring a field the first rows lack: the CSV's header has it, and
    no value lands under another column's name."""
    import csv

    data = [{"id": i, "text": f"row {i}"} for i in range(20)]
    for row in data[15:]:
        row["late"] = f"x{row['id']}"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    code, _, err = cli(
        "dataset", "score", "--model", folder, "--dataset", tmp_path / "in.jsonl", "--out", tmp_path / "out.csv", "--batch-size", "4"
    )
    assert code == 0, err
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        out = list(csv.DictReader(f))
    assert len(out) == 20 and all(None not in r for r in out)  # no row with more fields than the header
    assert [r["late"] for r in out] == [""] * 15 + [f"x{i}" for i in range(15, 20)]
    assert [r["text"] for r in out] == [f"row {i}" for i in range(20)]


def test_a_row_whose_generation_fails_gets_the_error_and_the_others_their_results(local_ray, model_dir, tmp_path, tokenizer_dir):
    """A checkpoint broken for one token (NaN in its embedding row, the output head untied and
    whole): prompts holding it fail, in their own rows; the rest of their batch is generated."""
    from picogpt_fast.checkpoint import save_pretrained
    from picogpt_fast.weights import random_weights

    from .conftest import make_config

    config = make_config("small")
    weights = random_weights(config, seed=5, std=0.25)
    wte = np.array(weights.wte)
    bad = GPT2.from_pretrained(model_dir("small", seed=5, std=0.25)).tokenizer.encode(" poison")[0]
    weights.lm_head = np.array(wte)
    wte[bad] = np.nan
    weights.wte = wte
    save_pretrained(tmp_path / "broken", config, weights, tokenizer_dir=tokenizer_dir)
    prompts = ["Hello there", "a poison apple", "Once upon a time", "more poison here"]
    out = generate_dataset(
        ray.data.from_items([{"prompt": p} for p in prompts]), str(tmp_path / "broken"), max_new_tokens=4, actors=1, batch_size=4
    )
    out = {r["prompt"]: r for r in out.take_all()}
    model = GPT2.from_pretrained(tmp_path / "broken")
    for p in prompts:
        if "poison" in p:
            assert out[p]["error"] and "NaN" in out[p]["error"] and out[p]["text"] is None
        else:
            assert out[p]["error"] is None and out[p]["ids"] == model.generate(p, 4)


def test_an_actor_that_keeps_dying_ends_the_job_instead_of_being_retried_forever(local_ray, folder, monkeypatch):
    from picogpt_fast.datasets import actors, job

    asked = {}
    map_batches = ray.data.Dataset.map_batches

    def recording(self, fn, **kwargs):
        asked.update(kwargs)
        return map_batches(self, fn, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording)
    out = generate_dataset(ray.data.from_items([{"prompt": "x"}]), str(folder), actors=1, max_new_tokens=2).take_all()
    assert len(out) == 1 and out[0]["error"] is None
    assert asked["max_restarts"] == asked["max_task_retries"] == actors.RESTARTS  # Ray's default restarts forever
    died = RuntimeError("ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.")
    assert "ran out of memory" in job._cause(died) and "--batch-size" in job._cause(died)


def test_a_job_leaves_no_log_behind_and_an_interrupted_one_says_what_it_left(folder, tmp_path):
    """Ray's log capture is removed when the job succeeds; Ctrl-C ends the job with one line saying
    that the old output was left as it was (exit 130)."""
    import subprocess

    from .conftest import PYTHON, child, subprocess_env

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 30}) + "\n" for i in range(400)), encoding="utf-8")
    temp = Path(tempfile.mkdtemp(dir="/tmp"))  # short: Ray's socket paths under it must fit in 107 bytes
    env = subprocess_env(TMPDIR=str(temp))
    args = [PYTHON, "-m", "picogpt_fast", "score", "--model", str(folder), "--dataset", str(tmp_path / "in.jsonl"), "--out"]
    r = subprocess.run([*args, str(tmp_path / "ok.jsonl"), "--batch-size", "50"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not list(temp.glob("picogpt-fast-ray-*.log"))
    (tmp_path / "old.jsonl").write_text("old\n")
    with child([*args, str(tmp_path / "old.jsonl"), "--batch-size", "1"], stderr=subprocess.PIPE, text=True, env=env) as p:
        time.sleep(12)  # Ray is up and the job under way
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=120)
        err = p.stderr.read()
    assert code == 130, err
    assert err.strip().splitlines()[-1] == f"interrupted: the job stopped, and {tmp_path / 'old.jsonl'} was left as it was"
    assert (tmp_path / "old.jsonl").read_text() == "old\n"
    shutil.rmtree(temp, ignore_errors=True)
