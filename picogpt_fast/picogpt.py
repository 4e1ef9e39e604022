"""picoGPT's API on the engine: change `from gpt2 import ...` / `from utils import ...` to
`from picogpt_fast.picogpt import ...` and the rest of a picoGPT script stays as it is.

    encoder, hparams, params = load_encoder_hparams_and_params("124M", "models")
    input_ids = encoder.encode("Alan Turing theorized that computers would one day become")
    output_ids = generate(input_ids, params, hparams["n_head"], 8)
    print(encoder.decode(output_ids))

`gpt2()` returns picoGPT's [n_seq, n_vocab] logits, `generate()` appends to `inputs` and returns
the new ids, greedy, exactly as picoGPT does; both run on the Numba engine with a KV cache. The
params dict has picoGPT's layout (`blocks[i]["attn"]["c_attn"]["w"]` is [n_embd, 3 * n_embd]).
Params built by `load_encoder_hparams_and_params` are views of the engine's own (read-only) float32
weights; params built any other way are converted once into the engine's layout (a copy, made on
the first call with those arrays; keep passing the same arrays to reuse it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import loader, tensors
from .config import GPT2Config
from .errors import InvalidArgumentError
from .hub import ALIASES
from .model import GPT2
from .weights import GPT2Weights, LayerWeights, params_from_weights

__all__ = ["generate", "gpt2", "load_encoder_hparams_and_params"]

# id(wte) -> (the params' leaf arrays, kept alive so ids stay unique, and the engine model)
_models: dict[int, tuple[list[np.ndarray], GPT2]] = {}


def _leaf(params: dict, path: tuple[str, ...]):
    for key in path:
        params = params[key]
    return params


def _leaves(wte, wpe, blocks, ln_f) -> list[np.ndarray]:
    return [wte, wpe, ln_f["g"], ln_f["b"], *(_leaf(b, t.picogpt) for b in blocks for t in tensors.LAYER)]


def _engine(wte, wpe, blocks, ln_f, n_head) -> GPT2:
    """The engine model for these params, built (and cached) on first use."""
    leaves = _leaves(wte, wpe, blocks, ln_f)
    hit = _models.get(id(wte))
    if hit is not None and len(hit[0]) == len(leaves) and all(a is b for a, b in zip(hit[0], leaves)):
        if hit[1].config.n_head == n_head:
            return hit[1]
    weights = _weights_from_params(wte, wpe, blocks, ln_f)
    config = GPT2Config(
        n_vocab=wte.shape[0],
        n_ctx=wpe.shape[0],
        n_embd=wte.shape[1],
        n_head=int(n_head),
        n_layer=len(blocks),
        n_inner=weights.layers[0].fc_w.shape[1] if blocks else 0,
    )
    model = GPT2(config, weights)
    _models[id(wte)] = (leaves, model)
    return model


def _weights_from_params(wte, wpe, blocks, ln_f) -> GPT2Weights:
    def f32(a):  # the same array when it already is float32 and C-contiguous
        return np.ascontiguousarray(a, dtype=np.float32)

    layers = [LayerWeights(**{t.field: f32(_leaf(b, t.picogpt)) for t in tensors.LAYER}) for b in blocks]
    wte = f32(wte)
    return GPT2Weights(wte=wte, wpe=f32(wpe), layers=layers, ln_f_g=f32(ln_f["g"]), ln_f_b=f32(ln_f["b"]), lm_head=wte)


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head):  # [n_seq] -> [n_seq, n_vocab]
    """picoGPT's forward pass: logits for every position."""
    return _engine(wte, wpe, blocks, ln_f, n_head).forward(list(inputs))


def generate(inputs, params, n_head, n_tokens_to_generate):
    """picoGPT's greedy loop: appends each new id to `inputs` and returns the new ids."""
    model = _engine(params["wte"], params["wpe"], params["blocks"], params["ln_f"], n_head)
    new_ids = model.generate(list(inputs), n_tokens_to_generate, stop_at_eos=False)
    inputs.extend(new_ids)
    return inputs[len(inputs) - n_tokens_to_generate :]


def load_encoder_hparams_and_params(model_size, models_dir):
    """picoGPT's loader: (encoder, hparams, params) for "124M", "355M", "774M" or "1558M".

    Uses models_dir/model_size when it exists: the TensorFlow checkpoint picoGPT downloaded there,
    or a safetensors checkpoint in Hugging Face's layout; otherwise the same OpenAI weights from the
    Hub (nothing is written to models_dir).
    """
    if model_size not in ALIASES:
        raise InvalidArgumentError(f"model_size {model_size!r} must be one of {', '.join(ALIASES)}")
    local = Path(os.fspath(models_dir)) / model_size
    resolved = loader.resolve(local if local.is_dir() else model_size)
    config, encoder = resolved.config, resolved.tokenizer
    model = GPT2(config, loader.load_weights(resolved, "float32"), encoder)
    params = params_from_weights(model.weights)  # views of the engine's float32 weights, in picoGPT's layout
    _models[id(params["wte"])] = (_leaves(params["wte"], params["wpe"], params["blocks"], params["ln_f"]), model)
    hparams = {
        "n_vocab": config.n_vocab,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_layer": config.n_layer,
    }
    return encoder, hparams, params
