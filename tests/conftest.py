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


MC_ITEMS = [
    {"question": "The capital of France is", "choices": [" Paris", " a banana", " seven"], "label": 0},
    {"question": "Ice is water that is", "choices": [" boiling", " frozen", " purple"], "label": 1},
    {"question": "One, two, three, four,", "choices": [" dog", " blue", " five"], "label": 2},
    {"question": "The sun rises in the", "choices": [" east", " piano"], "label": 0},
    {"question": "A week has seven", "choices": [" wheels", " days", " oceans"], "label": 1},
]
"""A small multiple-choice task: a question, its choices, the index of the right one."""
LAST_WORD_ITEMS = [
    {"text": "The cat sat on the mat"},
    {"text": "Once upon a time there lived a king"},
    {"text": "She poured a cup of hot tea"},
    {"text": "Open the door and close the window"},
]
"""A small last-word task (as LAMBADA): predict a text's last word from the words before it."""


def write_zeroshot_tasks(folder: Path) -> Path:
    """Task YAMLs of lm-evaluation-harness over local JSON lines files written here: ``ks_mc``
    (multiple choice: acc, acc_norm), ``ks_lastword`` (last word: acc); and, for refusals, ``ks_zero``
    (few-shot count fixed at 0), ``ks_generate`` (a generation task), ``ks_hub`` (data on the hub)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for name, items in (("mc.jsonl", MC_ITEMS), ("lastword.jsonl", LAST_WORD_ITEMS)):
        (folder / name).write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    mc = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
          "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{question}}'\n"
          "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
          "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
          "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    lastword = (f"task: ks_lastword\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {folder / 'lastword.jsonl'}\noutput_type: loglikelihood\ntest_split: test\n"
                "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
                "    higher_is_better: false\n"
                "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    generate = (f"task: ks_generate\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {folder / 'lastword.jsonl'}\noutput_type: generate_until\ntest_split: test\n"
                "doc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    hub = ("task: ks_hub\ndataset_path: EleutherAI/lambada_openai\ndataset_name: default\n"
           "output_type: loglikelihood\ntest_split: test\n"
           "doc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n")
    (folder / "ks_mc.yaml").write_text("task: ks_mc\n" + mc, encoding="utf-8")
    (folder / "ks_zero.yaml").write_text("task: ks_zero\nnum_fewshot: 0\n" + mc, encoding="utf-8")
    (folder / "ks_lastword.yaml").write_text(lastword, encoding="utf-8")
    (folder / "ks_generate.yaml").write_text(generate, encoding="utf-8")
    (folder / "ks_hub.yaml").write_text(hub, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def zeroshot_tasks(tmp_path_factory) -> Path:
    return write_zeroshot_tasks(tmp_path_factory.mktemp("tasks"))
