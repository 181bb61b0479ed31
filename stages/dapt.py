"""Domain-adaptive pre-training (DAPT, Gururangan et al. 2020): continue the masked-language-model
pre-training of a text encoder (dapt.base) on unlabelled texts of the target domain before fine-tuning
it. The texts are every example of paths.source (read as prepare.dataset, prepare.classes) except the
prepared validation and test examples, labels ignored: for the WordNet demo, ~55,000 noun glosses, of
which the 500 labelled training glosses are a small part.

Writes paths.dapt, a Hugging Face model folder (encoder weights, config, tokenizer) that model.name
`hf:<paths.dapt>` fine-tunes like any other (`make run TASK=text-dapt`), records it in paths.weights_lock
(origin: this stage), and paths.dapt_metrics: the masked-token loss on held-out texts before and after.

Run: dvc repro pretrain/dvc.yaml:dapt   (or: python -m stages.dapt)"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages import sources, weights
from stages.files import atomic_path, write_json
from stages.modality import adapter
from stages.params import DaptParams, Params, cli
from stages.splits import load_split


def texts_for(source: Path, prepare_p: Any, prepared: Path) -> np.ndarray:
    """The source's texts minus the prepared validation and test texts (no peeking at what is scored)."""
    src = sources.keep_classes(sources.read(prepare_p.dataset, Path(source), prepare_p), prepare_p.classes)
    if adapter(src.modality).PRETRAINING != "masked_lm":
        raise ValueError(f"dapt: {prepare_p.dataset} is {src.modality} data; domain-adaptive pre-training continues "
                         "a text encoder's masked-language-model training on text")
    held = {str(t) for name in ("val", "test") for t in load_split(prepared, name).x}
    return np.array([t for t in src.pool.x if str(t) not in held], dtype=object)


def run(source: Path, prepare_p: Any, prepared: Path, p: DaptParams, out: Path, metrics: Path,
        weights_lock: Path) -> dict[str, Any]:
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers import logging as hf_logging

    from stages.predict import device
    from stages.train import seed_everything

    began = time.perf_counter()
    texts = texts_for(source, prepare_p, prepared)
    base = weights.find_weights(p.base)
    weights.verify(base, weights_lock)
    hf_logging.set_verbosity_error()  # "some weights were not initialised" is expected: the MLM head is new
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tok = AutoTokenizer.from_pretrained(base.path)
    seed_everything(p.seed)
    mlm = AutoModelForMaskedLM.from_pretrained(base.path).to(device())
    order = np.random.default_rng(p.seed).permutation(len(texts))
    held, pool = texts[order[: p.eval_texts]], texts[order[p.eval_texts:]]
    body, head, loss_of = _objective(mlm, tok, p)

    before = _held_out_loss(mlm, loss_of, held, p.seed)
    print(f"DAPT of {p.base}: {len(pool):,} unlabelled texts ({len(held)} held out); {p.head_steps} steps of the new "
          f"MLM head alone, then {p.steps} of everything, batches of {p.batch_size}; held-out masked-token loss "
          f"{before:.3f} before")
    _train(mlm, body, head, loss_of, pool, p)
    after = _held_out_loss(mlm, loss_of, held, p.seed)
    name = _save_encoder(mlm, tok, base.path, out)
    entry = weights.lock(weights.find_weights(name), weights_lock)
    report = {"base": p.base, "model": name, "weights_sha256": weights.digest(entry["files"]),
              "n_texts": int(len(pool)), "n_held_out": int(len(held)), "head_steps": p.head_steps, "steps": p.steps,
              "batch_size": p.batch_size,
              "held_out_mlm_loss_before": round(before, 4), "held_out_mlm_loss_after": round(after, 4),
              "seconds": round(time.perf_counter() - began, 1)}
    write_json(metrics, report)
    print(f"held-out masked-token loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.1f} -> "
          f"{math.exp(after):.1f}); {name} recorded in {weights_lock}")
    return report


def _objective(mlm: Any, tok: Any, p: DaptParams) -> tuple[Any, Any, Callable[[np.ndarray], torch.Tensor]]:
    """The encoder, its masked-LM head, and the loss of a batch of texts under fresh random masks."""
    from transformers import DataCollatorForLanguageModeling

    from stages.predict import device

    collate = DataCollatorForLanguageModeling(tok, mlm_probability=p.mask_probability)

    def batch(rows: np.ndarray) -> dict[str, torch.Tensor]:
        enc = tok([str(t) for t in rows], truncation=True, max_length=p.max_length)
        return {k: v.to(device()) for k, v in collate([{"input_ids": ids} for ids in enc["input_ids"]]).items()}

    body = mlm.base_model
    heads = [m for n, m in mlm.named_children() if n != mlm.base_model_prefix]  # BERT: cls; RoBERTa: lm_head
    if len(heads) != 1:
        raise ValueError(f"dapt: {p.base}'s masked-LM head is {len(heads)} modules; dapt handles encoders whose head "
                         "is one module (BERT, MiniLM, RoBERTa)")
    head = heads[0]

    def loss_of(rows: np.ndarray) -> torch.Tensor:
        """Masked-token cross-entropy, the vocabulary logits computed at the masked positions only (15% of
        the tokens: the decoder over 30k words is most of an MLM step's cost)."""
        b = batch(rows)
        h = body(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        chosen = b["labels"] != -100
        return torch.nn.functional.cross_entropy(head(h[chosen]), b["labels"][chosen])

    return body, head, loss_of


def _held_out_loss(mlm: Any, loss_of: Callable[[np.ndarray], torch.Tensor], held: np.ndarray, seed: int) -> float:
    """Mean masked-token loss on the held-out texts, the same masks every time."""
    mlm.eval()
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        losses = [loss_of(held[i : i + 64]).item() for i in range(0, len(held), 64)]
    torch.set_rng_state(state)
    mlm.train()
    return float(np.mean(losses))


def _train(mlm: Any, body: Any, head: Any, loss_of: Callable[[np.ndarray], torch.Tensor], pool: np.ndarray,
           p: DaptParams) -> None:
    from tqdm.auto import tqdm

    # The encoder's own parameters, the word embeddings among them (the MLM decoder shares them).
    own = {id(t) for t in body.parameters()}
    new_head = [t for t in head.parameters() if id(t) not in own]
    gen = np.random.default_rng(p.seed + 1)
    warm = max(1, p.steps // 16)
    phases = (
        # A sentence-embedding checkpoint ships without an MLM head: train the new one first, with the encoder
        # frozen, so the encoder's first gradients do not come from a random head (the LP-FT argument).
        ("dapt head", p.head_steps, torch.optim.AdamW(new_head, lr=p.head_lr), lambda s: 1.0, False),
        ("dapt", p.steps, torch.optim.AdamW(mlm.parameters(), lr=p.lr, weight_decay=0.01),
         lambda s: min((s + 1) / warm, max(0.0, (p.steps - s) / max(p.steps - warm, 1))), True),
    )
    mlm.train()
    for desc, steps, opt, shape, everything in phases:
        for t in body.parameters():
            t.requires_grad_(everything)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
        bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
        for step in bar:
            loss = loss_of(pool[gen.integers(0, len(pool), p.batch_size)])
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"dapt: the masked-token loss became {loss.item()} at step {step} ({desc}); "
                                         f"nothing was written. Lower dapt.lr (now {p.lr}) or dapt.head_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mlm.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")


def _save_encoder(mlm: Any, tok: Any, base_path: Path, out: Path) -> str:
    """The encoder alone, in the base model's own class, saved to `out` (named `hf:<out>`): its pooler (which the MLM
    model has no use for) comes back from the base weights, so the folder loads exactly like the model it
    came from."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(base_path)
    encoder.load_state_dict(mlm.base_model.state_dict(), strict=False)
    with atomic_path(out) as tmp:
        encoder.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return f"hf:{out}"


def main(argv: list[str] | None = None) -> None:
    params: Params = cli(__doc__, argv)
    paths = params.paths
    run(paths.source, params.prepare, paths.prepared, params.dapt, paths.dapt, paths.dapt_metrics, paths.weights_lock)


if __name__ == "__main__":
    main()
