"""Prompt preprocessing, HF T5 loading and prompt encoding as the v1 pipeline does it (docs/MODEL.md §C.3).

The PixArt folder ships `text_encoder/` (T5-v1.1-XXL encoder, sharded safetensors + index) and `tokenizer/`
(SentencePiece `spiece.model`, no `tokenizer.json`). v1 tokenized with transformers 4.x's slow `T5Tokenizer`;
`T5SentencePieceTokenizer` gives the same ids on the `sentencepiece` package alone, so they do not change with the
transformers version (5.x has no slow T5 tokenizer and needs protobuf to convert spiece.model). transformers is
imported only when a text encoder is loaded;
bs4 and ftfy (requirements.txt) when a prompt is cleaned.
"""
from __future__ import annotations

import html
import json
import re
import urllib.parse
from pathlib import Path

import torch

from .errors import EasyAnimateLoadError
from .files import describe, find_weights, open_weights, read_json, validate_shapes


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
    tokenizer = load_tokenizer(tokenizer_dir)  # checked before transformers is imported

    import transformers
    from transformers import T5EncoderModel

    # transformers >= 4.56 renamed torch_dtype to dtype
    dtype_kwarg = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    try:
        encoder = T5EncoderModel.from_pretrained(str(encoder_dir), **{dtype_kwarg: dtype})
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # rare after the checks above; still name the folder
        raise EasyAnimateLoadError(f"{encoder_dir}: expected a loadable T5 encoder folder, transformers failed: "
                                   f"{type(e).__name__}: {e}") from None
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_tokenizer(tokenizer_dir):
    """The T5 tokenizer of a tokenizer/ folder (spiece.model; no tokenizer.json needed): `T5SentencePieceTokenizer`,
    which gives transformers 4.x's slow `T5Tokenizer` ids (what v1 ran) with any transformers version."""
    tokenizer_dir = Path(tokenizer_dir)
    vocab_file = tokenizer_dir / "spiece.model"
    if not vocab_file.is_file():
        raise EasyAnimateLoadError(f"{vocab_file}: expected the T5 SentencePiece tokenizer (spiece.model), "
                                   f"file not found")
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    legacy = config.get("legacy")
    # which special tokens eat the spaces beside them: as saved in the config (transformers >= 4.34 writes
    # added_tokens_decoder); added_tokens.json (older saves, the PixArt release) loads them without stripping; with
    # neither, the slow tokenizer's own defaults (the <extra_id_N> strip both sides)
    if isinstance(config.get("added_tokens_decoder"), dict):
        strip = {t["content"]: (bool(t.get("lstrip")), bool(t.get("rstrip")))
                 for t in config["added_tokens_decoder"].values()}
    elif (tokenizer_dir / "added_tokens.json").is_file():
        strip = {}
    else:
        strip = None
    return T5SentencePieceTokenizer(vocab_file, legacy=True if legacy is None else bool(legacy),
                                    extra_ids=int(config.get("extra_ids", 100)),
                                    model_max_length=int(config.get("model_max_length", 512)), strip=strip)


SPIECE_UNDERLINE = "\u2581"


class TokenizerOutput(dict):
    """`input_ids` and `attention_mask`, as keys and attributes (like transformers' BatchEncoding)."""

    __getattr__ = dict.__getitem__


class T5SentencePieceTokenizer:
    """transformers 4.x's slow `T5Tokenizer` (the one v1 used, docs/MODEL.md §C.3), on the `sentencepiece` package alone.

    transformers 5 has no slow T5Tokenizer: it converts spiece.model into a fast tokenizer, which needs protobuf
    (not a ComfyUI requirement) and fails without it. This class repeats what the slow tokenizer does, so the ids
    are the same with every transformers version, with or without protobuf: the special tokens (<pad>, </s>, <unk>,
    <extra_id_N>) written in the text are kept whole (the <extra_id_N> eat the spaces around them), the rest goes
    through SentencePiece; `legacy=False` (a tokenizer_config.json flag; absent = True, as the PixArt release) encodes
    the pieces after a special token without the dummy "▁" prefix; one </s> is appended unless the ids already end
    with it; truncation keeps room for it; padding is on the right with id 0 and a 0 mask.
    """

    def __init__(self, vocab_file, legacy: bool = True, extra_ids: int = 100, model_max_length: int = 512,
                 strip: dict | None = None):
        import sentencepiece as spm

        self.vocab_file = str(vocab_file)
        self.legacy = legacy
        self.model_max_length = model_max_length
        proto = Path(vocab_file).read_bytes()
        self.sp_model = spm.SentencePieceProcessor(model_proto=proto)
        # legacy=False: transformers re-serialises the model with add_dummy_prefix off (through protobuf)
        self._sp_encoder = self.sp_model if legacy else spm.SentencePieceProcessor(
            model_proto=_without_dummy_prefix(proto))
        size = self.sp_model.get_piece_size()
        self.pad_token, self.eos_token, self.unk_token = "<pad>", "</s>", "<unk>"
        self.pad_token_id, self.eos_token_id, self.unk_token_id = (
            self.sp_model.piece_to_id(t) for t in (self.pad_token, self.eos_token, self.unk_token))
        self.extra_ids = [f"<extra_id_{i}>" for i in range(extra_ids)]
        self.special_tokens = {t: self.sp_model.piece_to_id(t) for t in (self.pad_token, self.eos_token,
                                                                           self.unk_token)}
        self.special_tokens.update({t: size - 1 + extra_ids - i for i, t in enumerate(self.extra_ids)})
        self._special_by_id = {i: t for t, i in self.special_tokens.items()}
        # token -> (lstrip, rstrip): does it eat the spaces on its left / right (None: slow T5Tokenizer defaults)
        self._strip = strip if strip is not None else {t: (True, True) for t in self.extra_ids}
        # leftmost match, longest first at one position (transformers' added-token trie)
        self._special_split = re.compile("(" + "|".join(
            re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True)) + ")")
        self._unk_length = len(self._sp_encoder.encode(self.unk_token, out_type=str))

    def __len__(self):
        return len(self._special_by_id.keys() | set(range(self.sp_model.get_piece_size())))

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def tokenize(self, text: str) -> list:
        """Pieces of `text`; special tokens stay whole."""
        if not self.legacy and text:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = self._special_split.split(text)
        for i in range(1, len(parts), 2):  # odd indices: the special tokens
            lstrip, rstrip = self._strip.get(parts[i], (False, False))
            if rstrip and i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
            if lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
        tokens = []
        for i, part in enumerate(parts):
            if part:
                tokens.extend([part] if i % 2 else self._encode_piece_text(part))
        if not self.legacy and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.special_tokens:
            tokens = tokens[1:]
        return tokens

    def _encode_piece_text(self, text: str) -> list:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp_encoder.encode(text, out_type=str)
        # legacy=False: encode "<unk>" + text and drop the <unk> pieces, so the text gets no extra "▁"
        tokens = self._sp_encoder.encode(self.unk_token + text, out_type=str)
        return tokens[self._unk_length:] if len(tokens) >= self._unk_length else tokens

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.sp_model.piece_to_id(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._special_by_id.get(ids) or self.sp_model.id_to_piece(ids)
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None,
               truncation: bool = False) -> list:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if truncation:
            limit = (max_length or self.model_max_length) - (1 if add_special_tokens else 0)
            ids = ids[:max(limit, 0)]
        if add_special_tokens and not (ids and ids[-1] == self.eos_token_id):
            ids = ids + [self.eos_token_id]
        return ids

    def __call__(self, text, padding=False, max_length: int | None = None, truncation: bool = False,
                 add_special_tokens: bool = True, return_tensors=None, return_attention_mask: bool = True):
        """`input_ids` and `attention_mask` like transformers' tokenizer call (padding False/True/"longest"/
        "max_length", truncation True/False, return_tensors None or "pt"); a string gives flat lists."""
        single = isinstance(text, str)
        ids = [self.encode(t, add_special_tokens, max_length, truncation) for t in ([text] if single else text)]
        if padding == "max_length":
            width = max_length or self.model_max_length
        elif padding in (True, "longest"):
            width = max((len(x) for x in ids), default=0)
        elif padding in (False, None, "do_not_pad"):
            width = None
        else:
            raise ValueError(f"padding: expected True, False, 'longest' or 'max_length', found {padding!r}")
        masks = [[1] * len(x) for x in ids]
        if width is not None:
            masks = [m + [0] * (width - len(x)) for m, x in zip(masks, ids)]
            ids = [x + [self.pad_token_id] * (width - len(x)) for x in ids]
        if return_tensors == "pt":
            ids, masks = torch.tensor(ids, dtype=torch.long), torch.tensor(masks, dtype=torch.long)
        elif return_tensors is not None:
            raise ValueError(f"return_tensors: expected None or 'pt', found {return_tensors!r}")
        out = TokenizerOutput(input_ids=ids[0] if single and return_tensors is None else ids)
        if return_attention_mask:
            out["attention_mask"] = masks[0] if single and return_tensors is None else masks
        return out


def _without_dummy_prefix(proto: bytes) -> bytes:
    """A serialized SentencePiece ModelProto with normalizer_spec.add_dummy_prefix = False, without protobuf.

    Wire format: ModelProto field 3 is the NormalizerSpec message, whose field 3 is add_dummy_prefix (bool); a
    field repeated later wins, so appending `add_dummy_prefix = 0` (key 0x18, value 0x00) to it sets it.
    """
    def varint(data, pos):
        value = shift = 0
        while True:
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    def encode_varint(value):
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    out, pos, patched = bytearray(), 0, False
    while pos < len(proto):
        start = pos
        key, pos = varint(proto, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = varint(proto, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, body = varint(proto, pos)
            pos = body + length
            if field == 3:
                message = proto[body:pos] + b"\x18\x00"
                out += encode_varint(key) + encode_varint(len(message)) + message
                patched = True
                continue
        else:
            raise EasyAnimateLoadError(f"spiece.model: expected a SentencePiece model, found wire type {wire}")
        out += proto[start:pos]
    if not patched:
        out += b"\x1a\x02\x18\x00"  # no normalizer_spec at all: add one holding only add_dummy_prefix = 0
    return bytes(out)


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
