"""Tokenizer files for the models that are built here rather than downloaded.

The offline profiles (``tiny``, ``random-full``) are saved with ``save_pretrained`` and
loaded back through the same code as pretrained weights, so they need real tokenizer
files. Two sources need no network:

* Stable Diffusion's text encoder uses CLIP's byte-pair vocabulary; open_clip ships the
  same 49,408-token vocabulary, which is rewritten here in the Hugging Face file format.
* The captioners only need some vocabulary: a word-level tokenizer over a fixed list of
  everyday words, so that random weights still generate readable, noun-bearing text.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import open_clip
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

CAPTION_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[IMG]"]

# Everyday words: nouns that label sets often contain, and the glue of captions.
CAPTION_WORDS = (
    "a an the of on in with and at near by two three some is are sitting standing "
    "person man woman child people dog cat horse sheep cow bird car bus train truck "
    "bicycle motorbike boat aeroplane airplane bottle chair table sofa couch plant "
    "television monitor building house tree sky grass road street water sea river "
    "mountain hill field snow sand cloud wall window door floor roof bridge city "
    "flower garden park food plate cup book phone computer bed room kitchen picture photo"
).split()


def _clip_byte_unicode_table() -> list[str]:
    """The byte-to-character table of GPT-2/CLIP byte-level BPE, in vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer(folder: Path) -> None:
    """Write SD1.x's CLIP tokenizer (vocab.json, merges.txt) from open_clip's BPE file."""
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = _clip_byte_unicode_table()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77).save_pretrained(folder)


def build_caption_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer; padded with placeholder words to ``vocab_size``."""
    words = CAPTION_SPECIAL_TOKENS + CAPTION_WORDS
    if vocab_size is not None:
        words += [f"word{i}" for i in range(vocab_size - len(words))]
    model = models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        sep_token="[EOS]",
    )


def caption_token_ids(tokenizer: PreTrainedTokenizerFast, with_sep: bool) -> dict[str, int]:
    """The special token ids a captioner's config needs; BLIP's decoder also ends on ``sep``."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    return {**ids, "sep_token_id": tokenizer.sep_token_id} if with_sep else ids
