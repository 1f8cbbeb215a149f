"""Prompt cleaning is always the original's (docs/MODEL.md §C.3): the caption cleaning that EasyAnimate's pipeline
took from diffusers' PixArt-alpha pipeline, applied twice. The reference here is that code itself, diffusers'
`PixArtAlphaPipeline._text_preprocessing(text, clean_caption=True)`, which needs bs4 and ftfy (requirements.txt):
without them it silently falls back to lower-casing, which the first test rules out."""
import pytest

from easyanimate_model.text import preprocess_prompt

PROMPTS = [
    # URLs, handles, file names
    "A dog runs on the beach, see https://example.com/dogs?id=3 and www.pets.org/run for more @dogfan",
    "Sunset.JPG over the sea, photo by http://x.co/abc #123 shot on 1920x1080",
    # HTML
    "<p>A <b>red</b> car &amp; a <a href='https://cars.com'>blue</a> truck</p>",
    "&lt;div&gt;escaped markup&lt;/div&gt; &quot;quoted&quot; text<br/>next line",
    # CJK
    "一只猫 sitting on a 桌子, 日本語のテキスト and 한국어",
    "東京の夜景 Tokyo night view — neon lights",
    # emoji and mojibake
    "A happy dog 🐶🎉 running in the park ✨",
    "CafÃ© with a smile 😀 – “fancy” quotes and ‘single’ ones",
    # the defaults and plain text
    "A snowy forest landscape with a dirt road running through it. The road is flanked by trees covered in snow.",
    "Strange motion trajectory, a poor composition and deformed video, worst quality, normal quality",
    "  Mixed-Case_text with-many-dashes-in-it and under_scores  ",
]


@pytest.fixture(scope="module")
def original():
    from diffusers import PixArtAlphaPipeline

    pipe = object.__new__(PixArtAlphaPipeline)  # the text methods use no component

    def clean(text):
        return pipe._text_preprocessing(text, clean_caption=True)[0]

    # guard against the original's silent fallback to lower-casing when bs4/ftfy are missing
    assert clean("<b>Bold</b> at https://example.com") == "bold at"
    return clean


@pytest.mark.parametrize("prompt", PROMPTS)
def test_preprocess_prompt_equals_the_original(original, prompt):
    assert preprocess_prompt(prompt) == original(prompt)


def test_cleaning_removes_what_the_original_removes():
    assert preprocess_prompt("<b>Bold</b> text at https://example.com/x") == "bold text at"
    assert "猫" not in preprocess_prompt("一只猫 cat")
    assert preprocess_prompt("A Cat") == "a cat"
