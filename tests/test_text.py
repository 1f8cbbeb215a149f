"""Prompt preprocessing (docs/MODEL.md §C.3), T5 loading from the release layout, and prompt encoding."""
import json
import shutil

import pytest
import torch

from easyanimate_model import text
from easyanimate_model.errors import EasyAnimateLoadError
from easyanimate_model.tiny import write_text_encoder, write_tokenizer

# Outputs of the original PixArt/DeepFloyd `_clean_caption` applied twice (with the real bs4 + ftfy). None of these
# inputs contains HTML or mojibake, so bs4's text extraction and ftfy's repair leave them unchanged.
CLEANED = [
    ("  A Cat, on the MAT.  ", "a cat, on the mat."),
    ("Visit https://example.com/page now, @someone #12 photo.png", "visit now"),
    ("“Quoted” ‘single’ — dashes – here, 192.168.0.1 jc6640 free shipping",
     "\"quoted\" 'single' - dashes - here"),
    ("this-is-my-cute-cat_and_more", "this is my cute cat and more"),
    ("'Hello World'", "hello world"),
    ("1920x1080 wallpaper page 12 click for more...", "wallpaper"),
    ("A  B . C , D:E : f\\n g", "a b c , d:e: f g"),
    ("中文 mixed text", "mixed text"),
    ("%20encoded+plus%21 ***stars*** (brackets) [x] {y} a|b", "encoded plus! stars brackets x y a b"),
    (text.DEFAULT_NEGATIVE_PROMPT, text.DEFAULT_NEGATIVE_PROMPT.lower()),
]


def test_defaults_are_the_original_prompts():
    assert text.DEFAULT_PROMPT.startswith("A snowy forest landscape with a dirt road running through it.")
    assert text.DEFAULT_PROMPT.endswith("the peacefulness of the road.")
    assert text.DEFAULT_NEGATIVE_PROMPT.startswith("Strange motion trajectory, a poor composition")
    assert text.MAX_LENGTH == 120


def test_caption_cleaning_rules():
    for raw, cleaned in CLEANED:
        assert text.preprocess_prompt(raw) == cleaned
    assert text.preprocess_prompt("<b>Bold</b> &amp; text") == "bold text"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "text_encoder").mkdir()
    (root / "tokenizer").mkdir()
    write_text_encoder(root / "text_encoder", seed=0)
    write_tokenizer(root / "tokenizer")
    return root


def test_load_from_pipeline_and_subfolders(pipeline_dir):
    tokenizer, encoder = text.load_text_encoder(pipeline_dir)
    assert type(tokenizer).__name__ == "T5SentencePieceTokenizer" and type(encoder).__name__ == "T5EncoderModel"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert not encoder.training and encoder.dtype == torch.float32
    for folder in (pipeline_dir / "text_encoder", pipeline_dir / "tokenizer"):
        tok, enc = text.load_text_encoder(folder, dtype=torch.float16)
        assert enc.dtype == torch.float16
        assert torch.equal(enc.shared.weight, encoder.shared.weight.half())
        assert tok("a snowy road").input_ids == tokenizer("a snowy road").input_ids


def test_encode_prompt(pipeline_dir):
    tokenizer, encoder = text.load_text_encoder(pipeline_dir)
    embeds, mask = text.encode_prompt(tokenizer, encoder, ["A Snowy ROAD", "trees"])
    assert embeds.shape == (2, 120, 32) and mask.shape == (2, 120)
    ids = tokenizer(["a snowy road", "trees"], padding="max_length", max_length=120, return_tensors="pt")
    assert torch.equal(mask, ids.attention_mask)
    assert ids.input_ids[0, int(mask[0].sum()) - 1] == 1  # </s> appended, then pad id 0
    expected = encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    raw, _ = text.encode_prompt(tokenizer, encoder, "A Snowy ROAD", clean=False)
    assert raw.shape == (1, 120, 32) and not torch.allclose(raw[0], embeds[0])
    long, long_mask = text.encode_prompt(tokenizer, encoder, text.DEFAULT_PROMPT * 3, max_length=120)
    assert long.shape == (1, 120, 32) and long_mask.all()


def test_encode_prompt_half_precision(pipeline_dir):
    tokenizer, encoder = text.load_text_encoder(pipeline_dir, dtype=torch.bfloat16)
    embeds, _ = text.encode_prompt(tokenizer, encoder, "trees")
    assert embeds.dtype == torch.bfloat16


def test_load_errors_name_the_path(pipeline_dir, tmp_path):
    with pytest.raises(EasyAnimateLoadError, match="not found"):
        text.load_text_encoder(tmp_path / "missing")
    copy = tmp_path / "copy"
    shutil.copytree(pipeline_dir, copy)
    (copy / "tokenizer" / "spiece.model").unlink()
    with pytest.raises(EasyAnimateLoadError, match="spiece.model"):
        text.load_text_encoder(copy)
    shard = copy / "text_encoder" / "model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(EasyAnimateLoadError, match="model-00002-of-00002"):
        text.load_text_encoder(copy)
    config_file = copy / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "bert"}))
    with pytest.raises(EasyAnimateLoadError, match=r"config\.json.*'t5'.*'bert'"):
        text.load_text_encoder(copy)
    with pytest.raises(EasyAnimateLoadError, match="text_encoder/"):
        text.load_text_encoder(tmp_path)
