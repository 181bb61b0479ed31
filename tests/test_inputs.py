"""The preprocessing every model is trained, evaluated and served with (stages/inputs.py): numpy and the
`tokenizers` library, checked against the torch and transformers code it replaced."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages import text
from stages.inputs import decode_image, encode_texts, image_array
from stages.weights import PACKAGED


def _torch_reference(x: np.ndarray, pre: dict) -> np.ndarray:
    t = torch.from_numpy(x).float().div_(255.0)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    s = pre["image_size"]
    if t.shape[-2:] != (s, s):
        t = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    if pre["channels"] == 3 and t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    elif pre["channels"] == 1 and t.shape[1] == 3:
        t = t.mean(1, keepdim=True)
    mean, std = torch.tensor(pre["mean"]).view(1, -1, 1, 1), torch.tensor(pre["std"]).view(1, -1, 1, 1)
    return ((t - mean) / std).numpy()


@pytest.mark.parametrize("h,w,size", [(28, 28, 80), (96, 96, 32), (40, 60, 33), (7, 7, 64), (224, 224, 7), (32, 32, 32)])
@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_preprocessing_is_torchs_antialiased_bilinear_resize(h, w, size, rgb, channels):
    x = np.random.default_rng(h * w + size).integers(0, 256, (3, h, w, 3) if rgb else (3, h, w), dtype=np.uint8)
    pre = {"image_size": size, "channels": channels, "mean": [0.485, 0.456, 0.406][:channels],
           "std": [0.229, 0.224, 0.225][:channels]}
    got = image_array(x, pre)
    assert got.dtype == np.float32 and got.shape == (3, channels, size, size)
    # the same algorithm; float32 rounding in the weights differs (values here span about +-2.6)
    np.testing.assert_allclose(got, _torch_reference(x, pre), atol=1e-4, rtol=0)


def test_a_gray_picture_saved_as_rgb_feeds_a_grayscale_model_exactly_as_its_gray_array():
    gray = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    pre = {"image_size": 28, "channels": 1, "mean": [0.5], "std": [0.25]}
    as_rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(image_array(as_rgb, pre), image_array(gray, pre))
    mixed = as_rgb.copy()
    mixed[0, ..., 0] //= 2  # a colour image among them is still averaged
    assert not np.array_equal(image_array(mixed, pre)[0], image_array(gray, pre)[0])
    np.testing.assert_array_equal(image_array(mixed, pre)[1:], image_array(gray, pre)[1:])


def test_a_stored_image_decodes_to_the_array_prepare_keeps(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    from_path = decode_image(tmp_path / "a.png", 24, 10**6)
    from_bytes = decode_image((tmp_path / "a.png").read_bytes(), 24, 10**6)
    assert from_path.shape == (24, 24, 3) and from_path.dtype == np.uint8
    np.testing.assert_array_equal(from_path, from_bytes)  # a file on disk and an upload decode alike


TEXTS = ["a dog", "Ünïcödé café, naïve résumé 東京", "word " * 300, "  spaced   out  ", "emoji 😀 ok", "tab\tand\nline"]


@pytest.mark.parametrize("max_length", [8, 64, 512])
def test_text_encoding_equals_transformers_on_the_packaged_tokenizer(max_length):
    files = str(PACKAGED["hf:sentence-transformers/all-MiniLM-L6-v2"].path())
    ids, mask = text.tokenize(np.array(TEXTS, dtype=object), {"files": files, "max_length": max_length})
    ref = text.tokenizer(files)(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_text_encoding_equals_transformers_on_a_byte_level_tokenizer_without_a_pad_token(tmp_path):
    """GPT-2 style: byte-level BPE, no pad token of its own (text.tokenizer pads with eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    pre = {"files": str(tmp_path), "max_length": 16}
    ids, mask = text.tokenize(np.array(TEXTS, dtype=object), pre)
    ref = text.tokenizer(str(tmp_path))(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    served = encode_texts(text.fast_tokenizer(str(tmp_path), 16), TEXTS)  # what the server calls
    np.testing.assert_array_equal(served[0], ids.numpy())
