"""The text networks: a Hugging Face encoder with a pooled linear head, and the TF-IDF floor as a torch
module, both taking a text model's two inputs (stages/text.py: input_ids, attention_mask). Imported only to
build or train a text model (`import transformers` costs seconds); the model server never imports it.
Built by stages/zoo.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

POOLINGS = ("mean", "cls", "last")


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
