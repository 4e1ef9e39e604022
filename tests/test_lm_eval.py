"""EleutherAI's lm-evaluation-harness, unmodified, against the server: its `local-completions` model
with the server's own tokenizer (/tokenize, /detokenize, /tokenizer_info: no transformers, no
tokenizer folder), on two small local tasks, a multiple-choice one (loglikelihood) and a generation
one with five stop strings (lm-eval adds its end-of-text string: six). What lm-eval computes is
checked against the engine's own scores and generations."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("starlette", reason="the [serve] extra is not installed")
lm_eval = pytest.importorskip("lm_eval", reason="the [test] extra is not installed")

from picogpt_fast import GPT2  # noqa: E402

from .test_serve import NAME, Running  # noqa: E402

QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " London", " a cat"], "answer": 0},
    {"question": "Two plus two makes", "choices": [" four", " seven"], "answer": 0},
    {"question": "Once upon a time there", "choices": [" was", " is", " will be"], "answer": 0},
]
PROMPTS = [{"prompt": "Question: What is the sky?\nAnswer:", "target": " blue"}, {"prompt": "Once upon a time", "target": " there"}]
UNTIL = ["\n\n", "Question:", "</s>", "###", "Answer:"]


def _tasks(folder):
    (folder / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "gen.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (folder / "picogpt_mc.yaml").write_text(
        "task: picogpt_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "picogpt_gen.yaml").write_text(
        "task: picogpt_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def test_lm_eval_runs_a_loglikelihood_and_a_generation_task_against_the_server(model_dir, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    _tasks(tmp_path)
    model = GPT2.from_pretrained(model_dir("small", seed=7, std=0.25, n_ctx=1024))
    running = Running(model, max_batch=4, max_queue=32)
    try:
        args = f"model={NAME},base_url={running.url}/v1/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1"
        out = simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=["picogpt_mc", "picogpt_gen"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
            limit=None,
        )
    finally:
        running.stop()
    assert set(out["results"]) == {"picogpt_mc", "picogpt_gen"}
    mc = sorted(out["samples"]["picogpt_mc"], key=lambda s: s["doc_id"])
    for question, sample in zip(QUESTIONS, mc):
        context = model.tokenizer.encode(question["question"])
        for choice, resp in zip(question["choices"], sample["resps"]):
            whole = context + model.tokenizer.encode(choice)
            want = float(model.score(whole)[len(context) - 1 :].sum())
            assert math.isclose(resp[0][0], want, rel_tol=1e-5, abs_tol=1e-5), (question, choice)
    gen = sorted(out["samples"]["picogpt_gen"], key=lambda s: s["doc_id"])
    for prompt, sample in zip(PROMPTS, gen):
        (want,), _ = model.complete([prompt["prompt"]], 24, stop=[*UNTIL, "<|endoftext|>"])
        assert sample["resps"][0][0] == want.text
