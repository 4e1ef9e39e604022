"""The files a model folder holds, by name. This module imports nothing, so that every layer (the
loaders, the tokenizer, the Hub) reads the names from one place."""

# Hugging Face's layout: config, weights (one file, or an index and its shards), tokenizer.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# What is fetched from the Hub: the four files, or a sharded checkpoint's index and shards.
ALLOW_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, SHARD_INDEX_FILE, "model-*-of-*.safetensors", *TOKENIZER_FILES]
# OpenAI's layout, which picoGPT downloads: config, weights (the checkpoint index), vocabulary, merges.
OPENAI_FILES = ("hparams.json", "model.ckpt.index", "encoder.json", "vocab.bpe")
