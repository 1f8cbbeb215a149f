"""Prompt preprocessing, HF T5 loading and prompt encoding as the v1 pipeline does it (docs/MODEL.md §C.3).

The PixArt folder ships `text_encoder/` (T5-v1.1-XXL encoder, sharded safetensors + index) and `tokenizer/`
(SentencePiece `spiece.model`, no `tokenizer.json`), so the slow `T5Tokenizer` is used. transformers is imported
only when a text encoder is loaded; bs4 and ftfy (requirements.txt) when a prompt is cleaned.
"""
from __future__ import annotations

import html
import importlib.util
import json
import logging
import re
import urllib.parse
from pathlib import Path

import torch

from .errors import EasyAnimateLoadError
from .files import describe, find_weights, open_weights, read_json, validate_shapes

logger = logging.getLogger(__name__)

MAX_LENGTH = 120

# predict_t2v.py defaults (docs/MODEL.md §C.1).
DEFAULT_PROMPT = (
    "A snowy forest landscape with a dirt road running through it. The road is flanked by trees covered in snow, "
    "and the ground is also covered in snow. The sun is shining, creating a bright and serene atmosphere. The road "
    "appears to be empty, and there are no people or animals visible in the video. The style of the video is a "
    "natural landscape shot, with a focus on the beauty of the snowy forest and the peacefulness of the road."
)
DEFAULT_NEGATIVE_PROMPT = (
    "Strange motion trajectory, a poor composition and deformed video, worst quality, normal quality, "
    "low quality, low resolution, duplicate and ugly"
)


def _sub_steps(*pairs):
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


# The DeepFloyd-IF / PixArt caption cleaning, as ordered regex passes around the three library calls
# (BeautifulSoup text extraction, ftfy repair, double HTML unescape). Order matters: later passes see earlier output.
_URL_TLDS = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_BEFORE_HTML = _sub_steps(
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TLDS + r"))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TLDS + r"))", ""),
)
_MEDIA_EXTENSIONS = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_BEFORE_FTFY = _sub_steps(
    (r"@[\w\d]+\b", ""),  # @handles
    # CJK strokes, katakana ext., enclosed CJK, CJK compatibility, CJK ext. A, Yijing, CJK unified ideographs
    (r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+", ""),
    (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
     r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+", "-"),  # every dash kind -> "-"
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids
    (r"\\n", " "),  # literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _MEDIA_EXTENSIONS, ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}", " "),  # stray punctuation
    (r"\s+\.\s+", " "),
)
_SEPARATORS = re.compile(r"(?:\-|\_)")  # this-is-a-slug / this_is_a_slug
_AFTER_UNESCAPE = _sub_steps(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _MEDIA_EXTENSIONS + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # surrounding quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)


def _apply(steps, text: str) -> str:
    for pattern, replacement in steps:
        text = pattern.sub(replacement, text)
    return text


def _clean_caption(caption: str) -> str:
    try:
        from bs4 import BeautifulSoup
        import ftfy
    except ImportError as e:
        # the original cleans only when both happen to be installed; here they are requirements, so the prompt is
        # always cleaned the same way (docs/MODEL.md §C.3)
        raise ImportError(f"EasyAnimate prompt cleaning needs beautifulsoup4 and ftfy (requirements.txt): {e}; "
                          f"install them with `pip install beautifulsoup4 ftfy`") from None

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = _apply(_BEFORE_HTML, caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = _apply(_BEFORE_FTFY, caption)
    if len(_SEPARATORS.findall(caption)) > 3:
        caption = _SEPARATORS.sub(" ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption)))
    return _apply(_AFTER_UNESCAPE, caption).strip()


def preprocess_prompt(text: str) -> str:
    """The pipeline's `clean_caption=True` preprocessing with bs4 and ftfy present: the full caption cleaning
    (lower-casing; URLs, HTML, @handles, CJK, file names, ... removed) applied twice."""
    return _clean_caption(_clean_caption(text))


# A T5 encoder folder's weights, in the order transformers prefers them (sharded or not, safetensors or pickle)
T5_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
              "pytorch_model.bin")


def t5_folders(folder) -> tuple[Path, Path]:
    """(text_encoder dir, tokenizer dir) from a pipeline folder or one of its two subfolders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EasyAnimateLoadError(f"{folder}: expected a PixArt pipeline or T5 text_encoder folder, found "
                                   f"{describe(folder)}")
    if (folder / "text_encoder").is_dir():
        return folder / "text_encoder", folder / "tokenizer"
    if (folder / "config.json").is_file():
        return folder, folder if (folder / "spiece.model").is_file() else folder.parent / "tokenizer"
    if (folder / "spiece.model").is_file():
        return folder.parent / "text_encoder", folder
    raise EasyAnimateLoadError(
        f"{folder}: expected a PixArt pipeline folder (with text_encoder/ and tokenizer/) or a T5 text_encoder "
        f"folder (config.json + weights), found {describe(folder)}")


def read_t5_encoder(encoder_dir):
    """(transformers config dict, weights) of a T5 text_encoder folder; the weights (one file or shards, via
    `files.open_weights`) are checked against the config's T5EncoderModel, key by key and shape by shape, before any
    tensor is read."""
    encoder_dir = Path(encoder_dir)
    config_file = encoder_dir / "config.json"
    config = read_json(config_file, "the T5 encoder config.json")
    if config.get("model_type") != "t5":
        raise EasyAnimateLoadError(f"{config_file}: expected model_type 't5' (T5EncoderModel), found "
                                   f"{config.get('model_type')!r}")
    weights = open_weights(find_weights(encoder_dir, T5_WEIGHTS, "T5 weights"))
    validate_shapes(_encoder_shapes(weights.shapes), _t5_expected_shapes(config, config_file), weights.path,
                    optional={"shared.weight", "encoder.embed_tokens.weight"}, what="the config's T5 encoder")
    if "shared.weight" not in weights.shapes and "encoder.embed_tokens.weight" not in weights.shapes:
        raise EasyAnimateLoadError(f"{weights.path}: expected the T5 token embedding (shared.weight or "
                                   f"encoder.embed_tokens.weight), found neither")
    return config, weights


def _encoder_shapes(shapes: dict) -> dict:
    # a full T5 (encoder-decoder) file also loads as T5EncoderModel, which ignores the decoder, as transformers does
    return {k: s for k, s in shapes.items() if not k.startswith(("decoder.", "lm_head."))}


def _t5_expected_shapes(config: dict, source) -> dict:
    from transformers import T5Config, T5EncoderModel

    try:
        with torch.device("meta"):
            model = T5EncoderModel(T5Config.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise EasyAnimateLoadError(f"{source}: expected a T5 config, could not build the encoder: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_text_encoder(folder, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load (T5Tokenizer, T5EncoderModel) from a PixArt pipeline folder, its text_encoder/ or its tokenizer/."""
    encoder_dir, tokenizer_dir = t5_folders(folder)
    read_t5_encoder(encoder_dir)
    if not (tokenizer_dir / "spiece.model").is_file():
        raise EasyAnimateLoadError(f"{tokenizer_dir}: expected the T5 SentencePiece tokenizer (spiece.model), "
                                   f"file not found")

    import transformers
    from transformers import T5EncoderModel

    tokenizer = load_tokenizer(tokenizer_dir)
    # transformers >= 4.56 renamed torch_dtype to dtype
    dtype_kwarg = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    try:
        encoder = T5EncoderModel.from_pretrained(str(encoder_dir), **{dtype_kwarg: dtype})
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # rare after the checks above; still name the folder
        raise EasyAnimateLoadError(f"{encoder_dir}: expected a loadable T5 encoder folder, transformers failed: "
                                   f"{type(e).__name__}: {e}") from None
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_tokenizer(tokenizer_dir):
    """The slow SentencePiece T5Tokenizer of a tokenizer/ folder (spiece.model; no tokenizer.json needed), as v1."""
    from transformers import T5Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    return T5Tokenizer.from_pretrained(str(tokenizer_dir), legacy=_tokenizer_legacy(tokenizer_dir))


def _tokenizer_legacy(tokenizer_dir: Path) -> bool:
    """The tokenizer's `legacy` flag; absent means True (transformers' default, what v1 ran with).

    legacy=False needs protobuf; without it fall back to legacy=True, which tokenizes plain prompts identically
    (the two modes differ only right after special tokens written into the text).
    """
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    legacy = config.get("legacy")
    if legacy is False and importlib.util.find_spec("google.protobuf") is None:
        logger.warning("%s asks for legacy=False, which needs protobuf (not installed): using legacy=True", config_file)
        return True
    return True if legacy is None else legacy


def _version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def tokenize(tokenizer, prompts, max_length: int = MAX_LENGTH, clean: bool = True, **kwargs):
    """The pipeline's tokenization: (cleaned) text padded / truncated to `max_length` tokens with EOS and mask."""
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = [preprocess_prompt(p) if clean else p for p in prompts]
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                     **kwargs)


@torch.no_grad()
def encode_prompt(tokenizer, encoder, prompts, max_length: int = MAX_LENGTH, clean: bool = True):
    """T5 embeddings [B, max_length, C] (encoder dtype) and attention mask [B, max_length] (1 keep, 0 pad).

    clean=True applies `preprocess_prompt` (inference); clean=False encodes the raw text (training captions).
    """
    tokens = tokenize(tokenizer, prompts, max_length, clean, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    embeds = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return embeds.to(encoder.dtype), mask
