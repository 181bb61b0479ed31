"""The text modality (stages/modality.py's interface): texts in, (input_ids, attention_mask) into the model
(int64, batch x tokens: every text model's forward arguments and its ONNX input names), int8 by dynamic
quantisation, and the checkpoint's own fast tokenizer, configured once, in training, evaluation, export and
serving alike (the serving contract carries it; the server runs it with the `tokenizers` library alone).

A text model's checkpoint folder holds the encoder's config.json and the tokenizer files beside
model.safetensors, and its JSON says `"files": "."`, so it rebuilds offline from the folder alone. The
networks themselves are in stages/textnet.py. numpy at load time (the model server imports this module);
torch, transformers and onnxruntime inside the functions that need them."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is called from forked workers too
NAME = "text"
EXAMPLE_MODEL = "hf:sentence-transformers/all-MiniLM-L6-v2"  # a pre-trained model to suggest when none is named
REQUEST_FIELDS = ("texts",)
ACCEPTS_FILES = False
AUGMENTS = False
PRETRAINING = "masked_lm"  # stages/dapt.py continues an encoder's masked-language-model training
INPUTS = ("input_ids", "attention_mask")  # every text model's forward arguments, and its ONNX input names
FLOOR = "tfidf_linear"  # the baseline stage's floor: logistic regression on TF-IDF of tokens (zoo.TFIDF_LINEAR)
EXAMPLE_TEXTS = ("an example sentence", "and a second, longer example sentence")  # two lengths: no axis pinned
# A model folder holds its vocabulary in one of these (fast tokenizers, WordPiece, BPE, SentencePiece).
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


@functools.lru_cache(maxsize=8)
def tokenizer(files: str):
    from transformers import AutoTokenizer

    # Given a folder with config.json but no vocabulary, transformers builds a tokenizer that knows only its
    # special tokens: every word becomes [UNK] and predictions are garbage, with no error.
    if Path(files).is_dir() and not any((Path(files) / f).exists() for f in VOCABULARY_FILES):
        raise FileNotFoundError(f"{files} has no tokenizer vocabulary (none of {', '.join(VOCABULARY_FILES)}); "
                                f"copy the tokenizer files of the model it came from into it")
    tok = AutoTokenizer.from_pretrained(files)
    if tok.pad_token is None:  # GPT-2 style tokenizers have none; padding is masked out anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


@functools.lru_cache(maxsize=8)
def fast_tokenizer(files: str, max_length: int):
    """The tokenizer every text model is fed by, in training, evaluation, export and serving alike: the
    checkpoint's fast (Rust) tokenizer set to truncate at max_length and pad each batch to its longest
    text. Export saves it beside the ONNX file; the server loads it with the `tokenizers` library alone."""
    from tokenizers import Tokenizer

    from stages.inputs import configure_tokenizer

    tok = tokenizer(files)
    if not tok.is_fast:
        raise ValueError(f"{files}: the tokenizer has no fast (tokenizer.json) version; headstart serves a text "
                         "model with the `tokenizers` library, so use a model whose tokenizer has one")
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: transformers reconfigures its own
    return configure_tokenizer(backend, max_length, tok.pad_token_id, tok.pad_token, tok.padding_side)


def tokenize(texts: np.ndarray, pre: dict) -> tuple[Any, Any]:
    """Texts -> (input_ids, attention_mask) torch tensors, truncated to pre["max_length"], padded to the longest."""
    import torch

    from stages.inputs import encode_texts

    ids, mask = encode_texts(fast_tokenizer(str(pre["files"]), pre["max_length"]), texts)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def word_piece_ids(texts: np.ndarray, pre: dict) -> list[list[int]]:
    """Each text's token ids without the special tokens, truncated like every model's input: what the
    TF-IDF floor (and the select stage's tfidf candidate) counts."""
    tok = tokenizer(str(pre["files"]))
    special = set(tok.all_special_ids)
    enc = tok([str(t) for t in texts], truncation=True, max_length=pre["max_length"])["input_ids"]
    return [[i for i in row if i not in special] for row in enc]


def truncated_count(texts: np.ndarray, pre: dict) -> int:
    """How many texts are longer than max_length tokens (and so lose their end)."""
    tok = tokenizer(str(pre["files"]))
    return sum(len(ids) > pre["max_length"] for ids in tok([str(t) for t in texts])["input_ids"])


def save_files(model: Any, pre: dict, out: Path) -> dict:
    """Write what rebuilds `model` without its source, the encoder config and the tokenizer, into the
    checkpoint folder `out`; returns the preprocessing to record, which points at that folder."""
    from stages.textnet import TextClassifier

    if isinstance(model, TextClassifier):
        model.encoder.config.save_pretrained(out)
    tokenizer(str(pre["files"])).save_pretrained(out)
    return {**pre, "files": "."}


def model_input(x: np.ndarray, pre: dict) -> Any:
    """Texts -> the tuple (input_ids, attention_mask) of torch tensors."""
    return tokenize(x, pre)


def batch_order(x: np.ndarray) -> np.ndarray | None:
    """Shortest text first (by characters, a proxy for tokens): a batch pads to its longest text, so texts
    of like length batched together carry little padding."""
    return np.argsort([len(str(t)) for t in x], kind="stable")


def truncated(x: np.ndarray, pre: dict) -> int | None:
    """How many of the texts lose their end to max_length."""
    return truncated_count(x, pre)


def configure(pre: dict, model_p: Any) -> dict:
    return pre  # a checkpoint keeps its tokenizer, max_length and pooling


def input_names(pre: dict) -> tuple[str, ...]:
    return INPUTS


def example_inputs(pre: dict) -> tuple[Any, ...]:
    """Two texts of different lengths, tokenised: what export traces, so neither the batch nor the
    sequence axis is pinned by the example."""
    return tokenize(np.array(EXAMPLE_TEXTS, dtype=object), pre)


def dynamic_axes(pre: dict) -> dict[str, dict[int, str]]:
    """Any batch, any length up to max_length."""
    return {name: {0: "batch", 1: "sequence"} for name in INPUTS}


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, pre: dict) -> str:
    """Dynamic quantisation: int8 weights of every MatMul, activations quantised per batch at run time, the
    usual choice for transformers, where activation ranges vary too much across inputs for one static
    range (so `calibration` is not used). Returns how, for the log."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    return "dynamic"


def serving_input(pre: dict, stored: np.ndarray, max_pixels: int) -> dict:
    """The serving contract's input: max_length and the configured tokenizer itself."""
    tok = fast_tokenizer(str(pre["files"]), pre["max_length"])
    return {"max_length": pre["max_length"], "tokenizer": json.loads(tok.to_str())}


def serving_feed(contract_input: dict) -> Callable[[Any], dict[str, np.ndarray]]:
    """Texts -> the ONNX model's inputs, by the tokenizer the contract carries (built once, here)."""
    from tokenizers import Tokenizer

    from stages.inputs import encode_texts

    tok = Tokenizer.from_str(json.dumps(contract_input["tokenizer"]))
    return lambda examples: dict(zip(INPUTS, encode_texts(tok, examples), strict=True))


def warm_up_examples(contract_input: dict) -> Any:
    return ["warm up"]


def join(parts: list[Any]) -> Any:
    """Several requests' texts as one batch."""
    return [t for part in parts for t in part]


def input_params(pre: dict) -> dict[str, Any]:
    """The input settings a registered model records as run parameters."""
    return {k: pre[k] for k in ("max_length", "pooling") if k in pre}


def describe(pre: dict) -> str:
    return f"texts of up to {pre['max_length']} tokens ({pre.get('pooling', 'tf-idf')} pooling)"
