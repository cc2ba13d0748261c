"""Shared fixtures: a small offline tokenizer, tiny random causal LMs of several families."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on a network that is not there
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "test.txt"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"

FAMILIES = ("llama", "opt", "gpt2", "qwen2", "mistral", "gemma")


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_tokenizer():
    """A 512-token byte-level BPE trained on Python's documentation: offline, built in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = pydoc_text()
    tok.train_from_iterator([text[i : i + 4096] for i in range(0, len(text), 4096)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_config(family: str, vocab: int = 512):
    import transformers as tf

    common = dict(vocab_size=vocab, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                              max_position_embeddings=256, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                            max_position_embeddings=256, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, vocab_size=vocab)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                              max_position_embeddings=256, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                max_position_embeddings=256, **common)
    if family == "gemma":
        return tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1, head_dim=8,
                              max_position_embeddings=256, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    # Wider weights than the default init so activations span several orders of magnitude.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny LLaMA saved as a local model folder with its tokenizer, as a user would have one."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(pydoc_text()[:60_000], encoding="utf-8")
    return path
