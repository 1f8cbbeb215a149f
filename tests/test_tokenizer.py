"""The T5 tokenizer gives the ids of transformers 4.x's slow T5Tokenizer (what v1 ran, docs/MODEL.md §C.3; see
docs/ARCHITECTURE.md) with any transformers version, with or without protobuf.

The reference ids come from a real slow T5Tokenizer: in this interpreter when its transformers has one (4.x), else
in the 0.3.75 test host's venv ($T5_REFERENCE_PYTHON, default <repo>/.host/venv/bin/python, transformers 4.57),
so the current-ComfyUI tier (transformers 5, no protobuf) compares against it too. `legacy=False` folders need
protobuf in the reference: $T5_REFERENCE_PYTHONPATH (set by .ci/run) goes on its PYTHONPATH. Marked `every_host`:
every tier of .ci/run runs this file.
"""
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comfy_client import REPO_DIR
from easyanimate_model import text
from easyanimate_model.tiny import write_tokenizer

pytestmark = pytest.mark.every_host

PROMPTS = [
    text.DEFAULT_PROMPT, text.DEFAULT_NEGATIVE_PROMPT, "", " ", "a", "  two  spaces  ", " leading", "trailing ",
    "日本語のテキスト 漢字とかな", "中文提示词：一只熊猫在竹林里", "한국어 문장", "emoji 😀🎉👍🏽 ok", "ﬁ ligature ＡＢＣ fullwidth",
    "café naïve façade", "punct!!! ... ?? -- 'quotes' \"dq\" (x) [y] {z} a/b\\c 50% #1 @me",
    "tab\tnew\nline\r\n", "</s> mid </s>", "end </s>", " </s>", "x </s> y", "<pad><unk>x<extra_id_0> y <extra_id_99>z",
    "<extra_id_100>", "<extra_id_5>", "a <extra_id_1>", "a <extra_id_1>  b", "<extra_id_0>▁x", "<s> bos", "<unk>",
    "▁under▁score", "▁", "▁▁a", "a▁", "x" * 500, "word " * 200, "word " * 118 + "</s>", "word " * 119 + "</s>",
    "the snow " * 59 + "end",
]


def random_prompts(n=60, seed=0):
    """Mixed words, special tokens, CJK, emoji, punctuation and odd spacing."""
    rng = random.Random(seed)
    words = text.DEFAULT_PROMPT.split() + ["日本", "熊猫", "😀", "—", "…", "</s>", "<extra_id_7>", "<unk>", "ǅ", "Ⅻ",
                                           "\u00a0", "a\u0301", "﻿", "▁", "  ", "\t"]
    return ["".join(rng.choice(words) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(1, 160)))
            for _ in range(n)]


ALL_PROMPTS = PROMPTS + [p.lower() for p in PROMPTS] + random_prompts()

# run by the reference interpreter: slow T5Tokenizer ids for each folder; "saved" folders are first written by
# that transformers' save_pretrained (tokenizer_config.json with added_tokens_decoder)
REFERENCE = textwrap.dedent("""
    import json, sys, importlib.util
    from transformers import T5Tokenizer
    job = json.load(sys.stdin)
    has_protobuf = importlib.util.find_spec("google") is not None and importlib.util.find_spec("google.protobuf") is not None
    out = {}
    for name, folder, save_to in job["folders"]:
        if save_to:
            T5Tokenizer.from_pretrained(folder).save_pretrained(save_to)
            folder = save_to
        for legacy in (True, False):
            if not legacy and not has_protobuf:
                continue  # legacy=False needs protobuf in transformers 4.x
            config = f"{folder}/tokenizer_config.json"
            try:
                data = json.load(open(config))
            except FileNotFoundError:
                data = {}
            data["legacy"] = legacy
            json.dump(data, open(config, "w"))
            tok = T5Tokenizer.from_pretrained(folder)
            assert type(tok).__name__ == "T5Tokenizer", type(tok)
            enc = tok(job["prompts"], padding="max_length", max_length=120, truncation=True, add_special_tokens=True)
            out[f"{name}/{legacy}"] = [enc["input_ids"], enc["attention_mask"]]
    print(json.dumps(out))
""")


def reference_python():
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return sys.executable
    candidate = Path(os.environ.get("T5_REFERENCE_PYTHON") or REPO_DIR / ".host" / "venv" / "bin" / "python")
    if not candidate.exists():
        pytest.skip(f"transformers {transformers.__version__} has no slow T5Tokenizer and no reference interpreter "
                    f"with transformers 4.x at {candidate} (set T5_REFERENCE_PYTHON)")
    return str(candidate)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """{variant/legacy: (ids, masks)} from the slow T5Tokenizer, and {variant: folder} for ours."""
    root = tmp_path_factory.mktemp("t5tok")
    release, bare = root / "release", root / "spiece_only"
    release.mkdir(), bare.mkdir()
    write_tokenizer(release)  # the PixArt release layout: spiece.model, added_tokens.json, old tokenizer_config
    (bare / "spiece.model").write_bytes((release / "spiece.model").read_bytes())
    folders = [("release", str(release), None), ("saved", str(release), str(root / "saved")),
               ("spiece_only", str(bare), None)]
    job = json.dumps({"folders": folders, "prompts": ALL_PROMPTS})
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    if os.environ.get("T5_REFERENCE_PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["T5_REFERENCE_PYTHONPATH"],
                                                          env.get("PYTHONPATH")]))
    run = subprocess.run([reference_python(), "-c", REFERENCE], input=job, capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), {"release": release, "saved": root / "saved",
                                                              "spiece_only": bare}


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("variant", ["release", "saved", "spiece_only"])
def test_ids_equal_slow_t5tokenizer(reference, variant, legacy):
    expected, folders = reference
    if f"{variant}/{legacy}" not in expected:
        pytest.skip("legacy=False: the reference transformers 4.x needs protobuf, which its venv lacks")
    folder = folders[variant]
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, "legacy": legacy}))
    tokenizer = text.load_tokenizer(folder)
    ids, masks = expected[f"{variant}/{legacy}"]
    got = tokenizer(ALL_PROMPTS, padding="max_length", max_length=120, truncation=True, add_special_tokens=True)
    wrong = [(p, tokenizer.tokenize(p)[:20]) for p, a, b in zip(ALL_PROMPTS, ids, got.input_ids) if a != b]
    assert not wrong, f"{len(wrong)} of {len(ALL_PROMPTS)} prompts differ, e.g. {wrong[:3]}"
    assert got.attention_mask == masks
    assert all(len(x) == 120 for x in got.input_ids)
    truncated = [x for x, p in zip(got.input_ids, ALL_PROMPTS) if p == "word " * 200][0]
    assert truncated[-1] == tokenizer.eos_token_id and 0 not in truncated  # cut to 119 tokens + </s>


def test_loads_and_tokenizes_without_transformers_or_protobuf(tmp_path):
    """The library, the CLIP node and training share this loader: it must not need transformers' tokenizer
    machinery (transformers 5 turns spiece.model into a fast tokenizer that needs protobuf or tiktoken)."""
    write_tokenizer(tmp_path)
    expected = text.load_tokenizer(tmp_path)(PROMPTS, padding="max_length", max_length=120, truncation=True)
    script = textwrap.dedent(f"""
        import json, sys
        for blocked in ("transformers", "google", "google.protobuf", "tiktoken"):
            sys.modules[blocked] = None  # importing any of them now raises ImportError
        sys.path.insert(0, {str(REPO_DIR)!r})
        from easyanimate_model import text
        tok = text.load_tokenizer({str(tmp_path)!r})
        prompts = json.load(sys.stdin)
        for legacy in (True, False):
            tok = text.T5SentencePieceTokenizer(tok.vocab_file, legacy=legacy)
            enc = tok(prompts, padding="max_length", max_length=120, truncation=True, return_tensors="pt")
            print(json.dumps(enc.input_ids.tolist()))
    """)
    run = subprocess.run([sys.executable, "-c", script], input=json.dumps(PROMPTS), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    legacy_ids, non_legacy_ids = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert legacy_ids == expected.input_ids
    assert len(non_legacy_ids) == len(PROMPTS) and legacy_ids != non_legacy_ids  # the flag does change ids


def test_call_matches_transformers_conventions(tmp_path):
    write_tokenizer(tmp_path)
    tok = text.load_tokenizer(tmp_path)
    one = tok("a snowy road")
    assert one.input_ids == one["input_ids"] and one.input_ids[-1] == tok.eos_token_id
    assert one.attention_mask == [1] * len(one.input_ids)
    batch = tok(["a", "a snowy road"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, len(one.input_ids)) and batch.attention_mask[0].tolist().count(0) > 0
    assert tok.convert_ids_to_tokens(1) == "</s>" and tok.convert_ids_to_tokens([0, 2]) == ["<pad>", "<unk>"]
    assert tok.convert_tokens_to_ids("<extra_id_0>") == tok.vocab_size + 99 and len(tok) == tok.vocab_size + 100
    with pytest.raises(ValueError, match="padding"):
        tok("x", padding="sideways")
