"""Writes tests/data/openai-gpt2-tiny: a tiny GPT-2 checkpoint in OpenAI's TensorFlow layout (what
picoGPT downloads: variables model/h{i}/attn/c_attn/w of shape [1, in, out], ...), saved by
TensorFlow's own Saver so that the reader is checked against the real format. Every value is drawn
by np.random.default_rng(2019) in the order below, so tests reproduce them without TensorFlow.

Made with tensorflow-cpu 2.21.0 from PyPI:  python make_openai_checkpoint.py OUT_DIR
(the tests do not need TensorFlow; only regenerating the fixture does).
"""
import json, sys
import numpy as np
import tensorflow as tf

tf.compat.v1.disable_eager_execution()
out = sys.argv[1]
h = {"n_vocab": 300, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 2}
E, F = h["n_embd"], 4 * h["n_embd"]
shapes = [("model/wte", [h["n_vocab"], E]), ("model/wpe", [h["n_ctx"], E])]
for i in range(h["n_layer"]):
    p = f"model/h{i}/"
    shapes += [(p + "ln_1/g", [E]), (p + "ln_1/b", [E]), (p + "attn/c_attn/w", [1, E, 3 * E]), (p + "attn/c_attn/b", [3 * E]),
               (p + "attn/c_proj/w", [1, E, E]), (p + "attn/c_proj/b", [E]), (p + "ln_2/g", [E]), (p + "ln_2/b", [E]),
               (p + "mlp/c_fc/w", [1, E, F]), (p + "mlp/c_fc/b", [F]), (p + "mlp/c_proj/w", [1, F, E]), (p + "mlp/c_proj/b", [E])]
shapes += [("model/ln_f/g", [E]), ("model/ln_f/b", [E])]
rng = np.random.default_rng(2019)
values = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in shapes}
tvars = [tf.compat.v1.get_variable(name, initializer=tf.constant(v)) for name, v in values.items()]
saver = tf.compat.v1.train.Saver(tvars)
with tf.compat.v1.Session() as sess:
    sess.run(tf.compat.v1.global_variables_initializer())
    saver.save(sess, out + "/model.ckpt")
json.dump(h, open(out + "/hparams.json", "w"))
