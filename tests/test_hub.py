"""Model resolution through the real huggingface_hub code: a pre-populated cache in the Hub's layout
with HF_HUB_OFFLINE=1, the uncached and unreachable error paths, and downloads from a local
stand-in for the Hub (HF_ENDPOINT) that implements the endpoints snapshot_download calls.

The real Hub is unreachable here, so what is not covered is the network beyond that edge.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from picogpt_fast.errors import ModelNotFoundError
from picogpt_fast.files import ALLOW_PATTERNS
from picogpt_fast.hub import resolve_model

from .conftest import PYTHON, subprocess_env

COMMIT = "0123456789abcdef0123456789abcdef01234567"
EXTRA_FILES = {"pytorch_model.bin": b"\x80\x02pickle", "tf_model.h5": b"HDF", "onnx/decoder_model.onnx": b"ONNX"}


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(**env), timeout=300)


def populate_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """Write `source`'s files into a Hugging Face cache as snapshot_download leaves them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_offline_cache_hit(tmp_path, model_dir):
    cache = tmp_path / "hub"
    populate_cache(cache, "openai-community/gpt2", model_dir("small"))
    code = (
        "from picogpt_fast import GPT2\n"
        "for name in ('124M', 'openai-community/gpt2'):\n"
        "    m = GPT2.from_pretrained(name, backend='numpy')\n"
        "    print(m.config.n_embd, m.tokenizer.encode('Hello world'), m.generate('Hello', 3, stop_at_eos=False))\n"
    )
    r = run_py(code, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith("64 [15496, 995]")


def test_offline_cache_miss_is_one_clear_line(tmp_path):
    r = subprocess.run(
        [PYTHON, "-m", "picogpt_fast", "run", "hi", "--model", "gpt2-medium"],
        capture_output=True,
        text=True,
        env=subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path)),
        timeout=300,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "error: model gpt2-medium is not in the Hugging Face cache and HF_HUB_OFFLINE is set; connect, "
        "or name a local folder instead (or set PICOGPT_FAST_MODEL to one)"
    )
    assert r.stdout == ""
    r = subprocess.run(  # convert takes the model as its argument: the message names no option
        [PYTHON, "-m", "picogpt_fast", "convert", "gpt2-medium", "--dtype", "int8", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path)),
        timeout=300,
    )
    assert r.returncode == 1 and "name a local folder instead" in r.stderr and "--model" not in r.stderr


def test_unreachable_hub(tmp_path):
    r = subprocess.run(
        [PYTHON, "-m", "picogpt_fast", "tokenize", "hi", "--model", "355M"],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(
            HF_HUB_CACHE=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DISABLE_TELEMETRY="1"
        ),
    )
    assert r.returncode == 1
    assert (
        "model 355M (openai-community/gpt2-medium) is not in the Hugging Face cache and the Hub could not be reached; connect, or name a local folder"
        in r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1


def test_not_a_folder_nor_a_hub_id():
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a Hub id"):
        resolve_model("./no/such/folder")
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a Hub id"):
        resolve_model("not a valid id!")


# --------------------------------------------------------------------------- a local stand-in for the Hub
class FakeHub:
    """Serves repos from folders with the endpoints huggingface_hub's snapshot_download uses."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def files(self, repo: str) -> dict[str, bytes]:
        folder = self.repos[repo]
        out = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return {**out, **EXTRA_FILES}

    def handle(self, req, head: bool):
        path = req.path.split("?")[0]
        self.requests.append((req.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            # /api/models/{org}/{name}/revision/{rev} or /api/models/{org}/{name}/tree/{rev}
            kind_at = 4 if len(parts) > 4 and parts[4] in ("revision", "tree") else 3
            repo, kind, rev = "/".join(parts[2:kind_at]), parts[kind_at], parts[kind_at + 1]
            if repo not in self.repos:
                return self.error(req, 404, "RepoNotFound")
            if rev not in ("main", COMMIT):
                return self.error(req, 404, "RevisionNotFound")
            if kind == "revision":
                body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in self.files(repo)]}
            else:
                body = [
                    {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for f, d in self.files(repo).items()
                ]
            return self.send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if "resolve" in parts:
            i = parts.index("resolve")
            repo, rev, name = "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2 :])
            if repo not in self.repos:
                return self.error(req, 404, "RepoNotFound")
            data = self.files(repo).get(name)
            if data is None:
                return self.error(req, 404, "EntryNotFound")
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            return self.send(req, 200, data, {"ETag": etag, "X-Repo-Commit": COMMIT, "Content-Type": "application/octet-stream"}, head)
        return self.error(req, 404, "RepoNotFound")

    def send(self, req, code, body, headers, head):
        req.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            req.send_header(k, v)
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def error(self, req, code, error_code):
        body = json.dumps({"error": error_code}).encode()
        req.send_response(code)
        req.send_header("X-Error-Code", error_code)
        req.send_header("X-Error-Message", error_code)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def fake_hub(model_dir):
    hub = FakeHub({"gpt2": model_dir("small"), "openai-community/gpt2": model_dir("small"), "someone/fine-tune": model_dir("odd")})
    yield hub
    hub.close()


def hub_env(hub: FakeHub, cache: Path) -> dict:
    return dict(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")


def test_download_fetches_only_the_needed_files(tmp_path, fake_hub):
    code = "from picogpt_fast import GPT2\nm = GPT2.from_pretrained('gpt2', backend='numpy', revision='main')\nprint(m.config.n_embd)"
    r = run_py(code, **hub_env(fake_hub, tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "64"
    fetched = {p.split(f"/resolve/{COMMIT}/")[1] for m, p in fake_hub.requests if "/resolve/" in p and m == "GET"}
    assert fetched == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    snapshot = tmp_path / "models--gpt2" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    # a second process finds everything in the cache, offline
    r = run_py(code, **hub_env(fake_hub, tmp_path), HF_HUB_OFFLINE="1")
    assert r.returncode == 0 and r.stdout.strip() == "64", r.stderr


def test_tokenizer_only_downloads_two_files(tmp_path, fake_hub):
    r = subprocess.run(
        [PYTHON, "-m", "picogpt_fast", "tokenize", "Hello world", "--model", "someone/fine-tune"],
        capture_output=True,
        text=True,
        env=subprocess_env(**hub_env(fake_hub, tmp_path)),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "15496 995"
    fetched = {p.rsplit("/", 1)[1] for m, p in fake_hub.requests if "/resolve/" in p and m == "GET"}
    assert fetched == {"vocab.json", "merges.txt"}


def test_repo_and_revision_not_found(tmp_path, fake_hub):
    env = subprocess_env(**hub_env(fake_hub, tmp_path))
    r = subprocess.run(
        [PYTHON, "-m", "picogpt_fast", "tokenize", "x", "--model", "nobody/nothing"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "error: model nobody/nothing: no Hub repo nobody/nothing (or it is private); check the name, log in for "
        "private repos, or pass a local folder"
    )
    r = subprocess.run(
        [PYTHON, "-m", "picogpt_fast", "tokenize", "x", "--model", "gpt2", "--revision", "v9"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1
    assert "has no revision 'v9'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_allow_patterns_cover_sharded_checkpoints():
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "onnx/model.onnx",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
    ]
    assert sorted(filter_repo_objects(repo, allow_patterns=ALLOW_PATTERNS)) == [
        "config.json",
        "merges.txt",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "vocab.json",
    ]


def test_local_folder_wins_over_hub_id(tmp_path, model_dir, monkeypatch):
    shutil.copytree(model_dir("small"), tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("gpt2") == Path("gpt2")
