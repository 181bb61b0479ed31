"""The text model adapter (stages/text.py): pooling, the TF-IDF floor, and other encoder architectures
going through the same path as MiniLM, ONNX export included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages import checkpoint, text, textnet, weights, zoo
from stages.export import export_onnx, onnx_logits
from stages.params import ModelParams
from stages.predict import predict

from .conftest import tiny_hf_model

TEXTS = np.array(["a small dog", "bread with butter and a glass of milk", "the dog barked at the postman all day",
                  "rye"], dtype=object)


@pytest.mark.parametrize("model_type", ["roberta", "distilbert", "gpt2", "bert"])
def test_encoder_architectures_train_export_and_match_onnx_at_every_length(tmp_path, model_type):
    folder = tiny_hf_model(tmp_path / model_type, model_type)
    m = ModelParams(name=f"hf:{folder}", max_length=12, pooling="last" if model_type == "gpt2" else "mean")
    lock = tmp_path / "weights.lock"
    weights.lock(weights.find_weights(m.name), lock)
    loaded = zoo.load(m, 3, lock)
    model, pre = loaded.model.eval(), loaded.pre
    assert zoo.head_parameters(model) == ["head.weight", "head.bias"]
    assert zoo.features(model, *text.tokenize(TEXTS, pre)).shape == (4, 32)
    # the checkpoint rebuilds offline from its own folder (config + tokenizer saved beside the weights)
    checkpoint.save_checkpoint(tmp_path / "ckpt", model, {"architecture": loaded.architecture, "classes": list("abc"),
                                                   "preprocessing": pre})
    again, meta = zoo.load_checkpoint(tmp_path / "ckpt")
    assert np.allclose(predict(again, TEXTS, meta["preprocessing"]), predict(model, TEXTS, pre), atol=1e-6)
    # ONNX with dynamic batch and sequence axes: the same logits for one text, for all four (padded to
    # the longest), and for a text cut at max_length
    export_onnx(model, pre, tmp_path / "m.onnx", opset=17)
    long = np.array([" ".join(["word"] * 40)], dtype=object)
    assert text.truncated_count(np.concatenate([TEXTS, long]), pre) == 1  # only the 40-word text exceeds 12 tokens
    for batch in (TEXTS[:1], TEXTS, long):
        ref = predict(model, batch, pre)
        assert np.abs(onnx_logits(tmp_path / "m.onnx", batch, pre, batch_size=8) - ref).max() < 1e-4


def test_padding_does_not_change_a_text_s_logits(tmp_path):
    folder = tiny_hf_model(tmp_path / "bert", "bert")
    encoder = textnet.encoder(folder, pretrained=True)
    for pooling in ("mean", "cls", "last"):
        model = textnet.TextClassifier(encoder, pooling, 3).eval()
        pre = zoo.text_preprocessing(folder, 32, pooling)
        alone = predict(model, TEXTS[:1], pre)
        padded = predict(model, TEXTS, pre)[:1]  # padded to the longest text of the batch
        assert np.allclose(alone, padded, atol=1e-5), pooling


def test_tfidf_module_equals_scikit_learn(tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer

    folder = tiny_hf_model(tmp_path / "bert", "bert")
    pre = zoo.text_preprocessing(folder, 32, "mean")
    tok = text.tokenizer(str(folder))
    special = set(tok.all_special_ids)
    rows = [[i for i in r if i not in special] for r in tok(list(TEXTS))["input_ids"]]
    vec = TfidfVectorizer(analyzer=lambda r: r, lowercase=False)
    expected = vec.fit_transform(rows).toarray()
    module = textnet.TfidfLinear(len(tok), 2)
    columns = torch.tensor([int(t) for t in vec.get_feature_names_out()])
    module.idf[columns] = torch.from_numpy(vec.idf_).float()
    got = module.tfidf(*text.tokenize(TEXTS, pre))[:, columns].numpy()
    assert np.allclose(got, expected, atol=1e-6)


def test_remote_code_needs_a_pinned_revision():
    with pytest.raises(ValueError, match="needs model.revision pinned"):
        textnet.load_kwargs(trust_remote_code=True, revision=None)
    assert textnet.load_kwargs()["trust_remote_code"] is False


def test_a_model_folder_without_its_vocabulary_is_refused_not_tokenised_into_unknowns(tmp_path):
    # transformers would build a tokenizer of 5 special tokens from config.json alone: every word [UNK]
    folder = tiny_hf_model(tmp_path / "bert", "bert")
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    pre = zoo.text_preprocessing(folder, 16, "mean")
    with pytest.raises(FileNotFoundError, match="has no tokenizer vocabulary"):
        text.tokenize(TEXTS, pre)
