"""Tokenizer files beside a converted model: copied from a checkpoint, or a small byte-level one for
synthetic models (so that tests and demos can encode and decode text)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from anemll_fast.convert.errors import ConvertError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "added_tokens.json", "chat_template.jinja",
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIN_BYTE_VOCAB = 256 + len(BYTE_SPECIALS)


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES + ("config.json",):
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / name)
            copied.append(name)
    return copied


def write_tokenizer_config(out_dir: Path, *, bos: Optional[str], eos: Optional[str], pad: Optional[str] = None,
                           unk: Optional[str] = None, chat_template: Optional[str] = None,
                           add_bos: bool = False, max_length: int = 2048) -> None:
    cfg: Dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    for key, value in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)):
        if value is not None:
            cfg[key] = value
    if chat_template:
        cfg["chat_template"] = chat_template
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk))
               if v is not None}
    (Path(out_dir) / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def write_byte_tokenizer(out_dir: Path, vocab_size: int, context_length: int = 2048) -> None:
    """A byte-level BPE without merges: ids 0-2 are ChatML specials, 3-258 the 256 bytes, the rest unused
    placeholders up to vocab_size. Every text encodes, every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < MIN_BYTE_VOCAB:
        raise ConvertError(f"vocab_size {vocab_size} is too small for the byte tokenizer (needs {MIN_BYTE_VOCAB})")
    vocab: Dict[str, int] = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<unused_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(BYTE_SPECIALS)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    write_tokenizer_config(out_dir, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                           chat_template=CHATML_TEMPLATE, max_length=context_length)
