"""The tokenizer a GGUF file carries, as llama.cpp's own converter (convert_hf_to_gguf.py,
``LlamaModel.set_vocab``; llama.cpp vendored by llama-cpp-python 0.3.36) writes it for the Llama
family, read from a model folder's tokenizer files (for Qwen3-MoE, ``TextModel.set_vocab``: step 3
only):

1. ``tokenizer.model`` (SentencePiece): model ``llama``, pre-tokenizer ``default``, every piece with
   its score and type, added tokens from ``added_tokens.json`` and ``tokenizer_config.json``;
2. else a Llama SentencePiece-BPE ``tokenizer.json`` (byte fallback): ``gguf.LlamaHfVocab``;
3. else a byte-level BPE ``tokenizer.json`` (Llama 3, SmolLM): model ``gpt2`` with the merges and
   the pre-tokenizer llama.cpp recognises by the hash of the token ids of a fixed text
   (:data:`PRE_TOKENIZERS`, the converter's table for the Llama family); an unknown hash is refused,
   as the converter refuses it (llama.cpp would split text differently).

Then ``gguf.SpecialVocab`` (BOS/EOS/UNK/PAD ids, add-BOS/EOS flags, chat template), the
``add_prefix_space`` of tokenizer_config.json, and (LlamaModel) the converter's
``add_bos_token = false`` for a 49,152-token vocabulary. Nothing here runs code that came with the model (no
``trust_remote_code``).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

# SentencePieceTokenTypes of the converter (= gguf.TokenType values)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple "
    "emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо"
    " на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's"
    " there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The converter's get_vocab_base_pre entries for the tokenizers of the families written.
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
}


class VocabError(ValueError):
    """A tokenizer the GGUF export cannot write as llama.cpp would read it (one line)."""


@dataclass
class Vocab:
    """Everything the file's ``tokenizer.*`` keys hold."""

    model: str
    pre: str
    tokens: list[bytes | str]
    types: list[int]
    scores: list[float] | None
    special: Any  # gguf.SpecialVocab
    add_space_prefix: bool | None = None
    add_bos: bool | None = None
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer: Any) -> None:
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        with _quiet_gguf():
            self.special.add_to_gguf(writer, quiet=True)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)


@contextmanager
def _quiet_gguf():
    """gguf-py logs warnings about tokenizer details it ignores; cdq's stderr stays clean."""
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_vocab(folder: Path, config: dict[str, Any], *, llama: bool = True) -> Vocab:
    """The vocabulary of the tokenizer files in ``folder`` (see the module docstring); ``llama``:
    LlamaModel's rules, else TextModel's (byte-level BPE only)."""
    with _quiet_gguf():
        return _read_vocab(Path(folder), config, llama)


def _read_vocab(folder: Path, config: dict[str, Any], llama: bool) -> Vocab:
    import gguf

    folder = Path(folder)
    tok_config = _json(folder / "tokenizer_config.json")
    add_space_prefix = tok_config.get("add_prefix_space")
    vocab_size = config.get("vocab_size")
    if not llama:
        vocab = _byte_bpe(folder, vocab_size)
        vocab.add_space_prefix = add_space_prefix if isinstance(add_space_prefix, bool) else None
        return vocab
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece(folder, vocab_size, tok_config)
        vocab = Vocab(
            "llama", "default", tokens, types, scores, gguf.SpecialVocab(folder, n_vocab=len(tokens))
        )
    elif (folder / "tokenizer.json").is_file():
        try:
            hf = gguf.LlamaHfVocab(folder)
        except (FileNotFoundError, TypeError):
            vocab = _byte_bpe(folder, vocab_size)
        else:
            entries = list(hf.all_tokens())
            vocab = Vocab(
                "llama",
                "default",
                [text for text, _, _ in entries],
                [int(kind) for _, _, kind in entries],
                [score for _, score, _ in entries],
                gguf.SpecialVocab(folder, n_vocab=len(entries)),
            )
    else:
        raise VocabError(
            f"{folder} has no tokenizer.model or tokenizer.json: a GGUF file needs the tokenizer"
        )
    vocab.add_space_prefix = add_space_prefix if isinstance(add_space_prefix, bool) else None
    if vocab_size == 49152:  # the converter's rule for granite-small vocabularies (SmolLM's size too)
        vocab.add_bos = False
    return vocab


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise VocabError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``."""
    if token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    if (token.startswith("<|") and token.endswith("|>")) or (
        token.startswith("<｜") and token.endswith("｜>")
    ):
        return True
    return token.startswith("<unused") and token.endswith(">")


def _sentencepiece(
    folder: Path, vocab_size: int | None, tok_config: dict[str, Any]
) -> tuple[list[bytes], list[float], list[int]]:
    """The converter's ``_create_vocab_sentencepiece``."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(folder / "tokenizer.model"))
    size = vocab_size or processor.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [-10000.0] * size
    types = [UNUSED] * size
    for token_id in range(min(size, processor.vocab_size())):
        kind = NORMAL
        if processor.IsUnknown(token_id):
            kind = UNKNOWN
        elif processor.IsControl(token_id):
            kind = CONTROL
        elif processor.IsUnused(token_id):
            kind = UNUSED
        elif processor.IsByte(token_id):
            kind = BYTE
        tokens[token_id] = processor.IdToPiece(token_id).encode("utf-8")
        scores[token_id] = processor.GetScore(token_id)
        types[token_id] = kind
    added = _json(folder / "added_tokens.json")
    for key, token_id in added.items():
        if isinstance(token_id, int) and 0 <= token_id < size:
            tokens[token_id], scores[token_id], types[token_id] = key.encode("utf-8"), -1000.0, USER_DEFINED
    decoder = tok_config.get("added_tokens_decoder", {})
    for key, data in decoder.items() if isinstance(decoder, dict) else ():
        token_id, token = int(key), str(data.get("content", ""))
        if token_id >= size:
            continue
        if data.get("special") or looks_special(token):
            types[token_id] = CONTROL
        else:
            token = token.replace("\u2581", " ")
            types[token_id] = USER_DEFINED
        scores[token_id] = -1000.0
        tokens[token_id] = token.encode("utf-8")
    return tokens, scores, types


def _byte_bpe(folder: Path, vocab_size: int | None) -> Vocab:
    """The converter's ``_set_vocab_gpt2`` (``get_vocab_base`` and ``get_vocab_base_pre``)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        raise VocabError(
            "the tokenizer's BPE pre-tokenizer is not one llama.cpp's converter knows for these families "
            f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); llama.cpp would split text differently"
        )
    size = vocab_size or len(tokenizer.vocab)
    reverse = {token_id: token for token, token_id in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[bytes | str] = []
    types: list[int] = []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return Vocab("gpt2", pre, tokens, types, None, gguf.SpecialVocab(folder, load_merges=True))
