"""The text side of the model zoo: a Hugging Face encoder with a pooled linear head, the TF-IDF floor as a
torch module, and tokenisation. Imported only for text models (`import transformers` costs seconds).

A text model's checkpoint folder holds the encoder's config.json and the tokenizer files beside
model.safetensors, and its JSON says `"files": "."`, so it rebuilds offline from the folder alone. Every
text model takes the same two inputs, `input_ids` and `attention_mask` (int64, batch x tokens)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is called from forked workers too
POOLINGS = ("mean", "cls", "last")
INPUTS = ("input_ids", "attention_mask")  # every text model's forward arguments, and its ONNX input names


class TextClassifier(nn.Module):
    """Encoder -> pooled token states -> linear head. `mean` averages the non-padding tokens (what
    sentence-transformers trained all-MiniLM-L6-v2 for), `cls` takes the first token (BERT's
    pre-training target), `last` the last non-padding one (decoder-only models such as GPT-2)."""

    def __init__(self, encoder: nn.Module, pooling: str, num_classes: int) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        if self.pooling == "mean":
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.pooling == "cls":
            return h[:, 0]
        last = attention_mask.long().sum(1).sub(1).clamp_min(0)  # padding is on the right
        return h[torch.arange(h.shape[0], device=h.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(input_ids, attention_mask))


class TfidfLinear(nn.Module):
    """TF-IDF over the tokenizer's (sub)word ids followed by a linear layer: logistic regression on TF-IDF,
    the classic text floor, in the same two-input form as the networks so every consumer treats it alike.
    Equals scikit-learn's TfidfVectorizer (raw counts, smoothed idf, l2 norm) on the same token ids; ids
    never seen in training have idf 0, as they have no column there."""

    def __init__(self, vocab_size: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("idf", torch.zeros(vocab_size))
        self.linear = nn.Linear(vocab_size, num_classes)

    def tfidf(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(input_ids.shape[0], self.idf.shape[0], device=input_ids.device)
        counts.scatter_add_(1, input_ids, attention_mask.float())
        x = counts * self.idf
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.tfidf(input_ids, attention_mask))


TFIDF = "tfidf_linear"


def load_kwargs(trust_remote_code: bool = False, revision: str | None = None) -> dict[str, Any]:
    # Code from a model repository runs only when the params allow it for a pinned revision.
    if trust_remote_code and not revision:
        raise ValueError("model.trust_remote_code: true needs model.revision pinned to a commit, so the code "
                         "that runs is the code that was reviewed")
    return {"trust_remote_code": bool(trust_remote_code), **({"revision": revision} if revision else {})}


def encoder(files: Path, pretrained: bool, **kwargs: Any) -> nn.Module:
    """The encoder from a folder with config.json (and model.safetensors when `pretrained`). Eager
    attention: the same maths as the fused kernels, and it exports to ONNX everywhere."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(files, **kwargs)
    config._attn_implementation = "eager"
    if pretrained:
        return AutoModel.from_pretrained(files, config=config, use_safetensors=True, **kwargs)
    return AutoModel.from_config(config, **{k: v for k, v in kwargs.items() if k == "trust_remote_code"})


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


def tokenize(texts: np.ndarray, pre: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (input_ids, attention_mask), truncated to pre["max_length"], padded to the longest."""
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


def save_files(model: nn.Module, pre: dict, out: Path) -> None:
    """Write what rebuilds `model` without its source: the encoder config and the tokenizer."""
    if isinstance(model, TextClassifier):
        model.encoder.config.save_pretrained(out)
    tokenizer(str(pre["files"])).save_pretrained(out)
