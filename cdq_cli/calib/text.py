"""Text for calibration and perplexity: named data sets via ``datasets``, or local files.

Both protocols follow the GPTQ reference code (IST-DASLab/gptq ``datautils.py``) so results are
comparable with published numbers: calibration draws random documents and random windows from them
with a seeded ``random.Random``; evaluation joins the split with ``"\\n\\n"`` and tokenizes it once,
except C4 (``c4``), whose evaluation is GPTQ's 256 random windows of random validation documents
(:func:`c4_validation_windows`). Named data sets stream (``datasets`` streaming mode): only the rows
are read, no split is downloaded and converted to a cache first.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..offline import data_dir, hub_offline


class DataSourceError(ValueError):
    """A calibration or evaluation source that cannot be read; the message is one line for the CLI."""


# GPTQ's C4 protocol uses one fixed shard per split, not the whole 300 GB corpus.
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


@dataclass(frozen=True)
class NamedSource:
    """A data set cdq streams from the hub by name: ``eval_split`` is the split ``cdq eval`` and
    ``--eval`` score (GPTQ's: WikiText-2 test, PTB test, C4 validation), ``offline_copy`` the file
    of the shared offline data to suggest instead when the hub cannot be reached, and ``read(split)``
    its texts (a corpus joined into one text, or one text per document)."""

    name: str
    eval_split: str
    offline_copy: str
    read: Callable[[str], list[str]]


def _c4(split: str) -> list[str]:
    if split not in _C4_FILES:
        raise DataSourceError(f"c4 has splits {', '.join(_C4_FILES)}, not '{split}'")
    rows = _stream_rows("allenai/c4", None, split, data_files={split: _C4_FILES[split]})
    return [row["text"] for row in rows]  # one fixed shard per split (GPTQ's), read row by row


def _wikitext2(split: str) -> list[str]:
    return ["\n\n".join(row["text"] for row in _stream_rows("wikitext", "wikitext-2-raw-v1", split))]


def _ptb(split: str) -> list[str]:
    # datasets >= 4 runs no loading scripts: PTB is read from the hub's Parquet export
    rows = _stream_rows("ptb_text_only", "penn_treebank", split, revision="refs/convert/parquet")
    return ["\n\n".join(row["sentence"] for row in rows)]


NAMED_SOURCES: dict[str, NamedSource] = {
    source.name: source
    for source in (
        NamedSource("c4", "validation", "c4-sample.jsonl", _c4),
        NamedSource("wikitext2", "test", "wikitext2-raw-test.txt", _wikitext2),
        NamedSource("ptb", "test", "ptb-test.txt", _ptb),
    )
}


def eval_split(source: str) -> str | None:
    """The split a named source is scored on (None for a local path)."""
    named = NAMED_SOURCES.get(source.lower())
    return named.eval_split if named is not None else None


_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_SUFFIXES = (".txt", *_JSON_SUFFIXES)


def load_texts(source: str, *, split: str | None = None) -> list[str]:
    """Documents of ``source``: a named data set (``c4``, ``wikitext2``, ``ptb``) or a local path.

    Named sources read ``split`` (default ``"train"``, the calibration split; see :func:`eval_split`).
    WikiText-2 and PTB are continuous corpora, so they come back as ONE text, their rows joined
    with ``"\\n\\n"`` as the GPTQ evaluation does; C4 comes back one document per row. Local paths
    (``split`` is ignored): ``.txt`` is one text; ``.jsonl``/``.json`` (optionally ``.gz``) hold one
    JSON object with ``"text"`` per line; a folder contributes all such files inside it, sorted.
    A named source wins over a same-named folder; write ``./c4`` for the folder.
    """
    if source.lower() in NAMED_SOURCES:
        return _load_named(source.lower(), split or "train")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(f"no such file or folder: {source} (named sources: {', '.join(NAMED_SOURCES)})")
    texts = _load_folder(path) if path.is_dir() else _load_file(path)
    if not any(texts):
        raise DataSourceError(f"calibration/evaluation source {source} holds no text")
    return texts


def calibration_windows(
    texts: str | Sequence[str],
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    max_draws: int = 10_000,
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``(nsamples, seqlen)`` token ids: the GPTQ calibration protocol, reproducible from ``seed``.

    For each sample: draw a random document, re-draw while its tokenization is not longer than
    ``seqlen``, then take a random window of ``seqlen`` tokens from it. The draws make the same
    ``randint`` calls as GPTQ's ``get_c4`` (and, for a single text, its ``get_wikitext2``: no
    document draw), so the same seed, text and tokenizer give the same windows.
    Documents are tokenized only when drawn (and once). ``stats``, when given, receives
    ``source_tokens``: how many tokens the source holds when the draws saw all of it (so a source
    shorter than ``nsamples × seqlen`` shows: its windows overlap), else None (plenty).

    Fallback, for sources whose documents are too short (e.g. a small JSONL sample at
    seqlen 2048): when one sample needs more than ``max_draws`` draws, or every document has been
    seen to be too short, the remaining samples are random windows of the documents concatenated
    in source order with ``"\\n\\n"`` (only as many documents as give ~4 x the tokens still needed).
    """
    if nsamples < 1 or seqlen < 1:
        raise DataSourceError(f"nsamples and seqlen must be >= 1 (got nsamples={nsamples}, seqlen={seqlen})")
    docs = [texts] if isinstance(texts, str) else list(texts)
    if not docs:
        raise DataSourceError("calibration data holds no documents")
    rng = random.Random(seed)
    short: set[int] = set()
    long: dict[int, torch.Tensor] = {}
    windows: list[torch.Tensor] = []
    while len(windows) < nsamples:
        for _ in range(max_draws):
            i = rng.randint(0, len(docs) - 1) if len(docs) > 1 else 0
            if i not in short and i not in long:
                ids = _encode(tokenizer, docs[i])
                if len(ids) > seqlen:
                    long[i] = torch.tensor(ids, dtype=torch.long)
                else:
                    short.add(i)
            if i in long:
                start = rng.randint(0, len(long[i]) - seqlen - 1)
                windows.append(long[i][start : start + seqlen])
                break
            if len(short) == len(docs):
                break
        else:
            break  # max_draws exhausted: fall back
        if len(short) == len(docs):
            break
    whole = len(short) + len(long) == len(docs)  # every document was read: its length is known
    if stats is not None:
        stats["source_tokens"] = sum(len(ids) for ids in long.values()) if whole and not short else None
    if len(windows) < nsamples:
        budget = 4 * (nsamples - len(windows)) * seqlen
        stream = _concatenation(docs, tokenizer, budget=budget)
        if len(stream) < seqlen:
            raise DataSourceError(
                f"calibration data has {len(stream)} tokens, fewer than one window of {seqlen}"
            )
        if stats is not None:
            stats["source_tokens"] = len(stream) if len(stream) < budget else None
        while len(windows) < nsamples:
            start = rng.randint(0, len(stream) - seqlen)
            windows.append(stream[start : start + seqlen])
    return torch.stack(windows)


C4_EVAL_WINDOWS = 256  # GPTQ's C4 perplexity: 256 windows of the validation shard
C4_EVAL_SEED = 0


def c4_validation_windows(
    docs: Sequence[str],
    tokenizer: Any,
    *,
    seqlen: int,
    count: int = C4_EVAL_WINDOWS,
    seed: int = C4_EVAL_SEED,
) -> torch.Tensor:
    """``(count, seqlen)`` token ids: GPTQ's C4 evaluation windows (its ``get_c4``).

    With ``random.seed(seed)``'s sequence: ``count`` times, draw a random document until one is
    longer than ``seqlen`` tokens, then take a random window of ``seqlen`` tokens from it (the same
    ``randint`` calls as GPTQ, so the same documents, tokenizer and seed give the same windows).
    Documents are tokenized only when drawn (and once). Fails with one line when no document is
    longer than ``seqlen``.
    """
    if not docs:
        raise DataSourceError("the C4 evaluation data holds no documents")
    rng = random.Random(seed)
    encoded: dict[int, list[int]] = {}
    short: set[int] = set()
    windows: list[torch.Tensor] = []
    for _ in range(count):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in encoded:
                encoded[i] = _encode(tokenizer, docs[i])
            if len(encoded[i]) > seqlen:
                break
            short.add(i)
            if len(short) == len(docs):
                raise DataSourceError(
                    f"no C4 evaluation document is longer than {seqlen} tokens (try a smaller --seqlen)"
                )
        ids = encoded[i]
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
    return torch.stack(windows)


def evaluation_ids(text_or_texts: str | Sequence[str], tokenizer: Any, *, sep: str = "\n\n") -> torch.Tensor:
    """``(1, N)`` token ids of the whole evaluation text, tokenized once (GPTQ protocol).

    Documents are joined with ``sep`` (GPTQ uses ``"\\n\\n"``; its C4 evaluation uses ``" "`` over
    the first 1,100 validation documents and keeps 256 windows); a single string is used as is.
    """
    text = text_or_texts if isinstance(text_or_texts, str) else sep.join(text_or_texts)
    if not text:
        raise DataSourceError("evaluation text is empty")
    return torch.tensor([_encode(tokenizer, text)], dtype=torch.long)


def text_fingerprint(texts: str | Sequence[str]) -> str:
    """sha256 (hex) of the texts, for the report. A single text (a string or a one-element list)
    hashes as its UTF-8 bytes, so a ``.txt`` source's fingerprint equals ``sha256sum`` of the file;
    several documents hash each one's length and bytes, so document boundaries count."""
    digest = hashlib.sha256()
    if isinstance(texts, str) or len(texts) == 1:
        digest.update((texts if isinstance(texts, str) else texts[0]).encode("utf-8"))
    else:
        for text in texts:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: the "longer than model_max_length" warning is expected for whole corpora.
    return list(tokenizer(text, verbose=False)["input_ids"])


def _concatenation(docs: list[str], tokenizer: Any, *, budget: int) -> torch.Tensor:
    count, used = 0, len(docs)
    if len(docs) > 1:
        for k, doc in enumerate(docs):
            count += len(_encode(tokenizer, doc))
            if count >= budget:
                used = k + 1
                break
    return torch.tensor(_encode(tokenizer, "\n\n".join(docs[:used])), dtype=torch.long)


def _load_named(name: str, split: str) -> list[str]:
    source = NAMED_SOURCES[name]
    root = data_dir()
    copy = root / "text" / source.offline_copy if root else None
    hint = str(copy) if copy is not None and copy.exists() else f"../shared/data/text/{source.offline_copy}"
    fail = f"cannot load '{name}' ({split}) from the Hugging Face hub; pass a local file instead, e.g. {hint}"
    if hub_offline():
        raise DataSourceError(f"{fail} (offline)")
    try:
        return source.read(split)
    except DataSourceError:
        raise
    except Exception as exc:  # network, hub and format errors surface while iterating: one line
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataSourceError(f"{fail} ({reason})") from exc


def _stream_rows(
    path: str,
    config: str | None,
    split: str,
    *,
    data_files: dict[str, str] | None = None,
    revision: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows of a hub data set, streamed (``datasets`` streaming mode: nothing is downloaded
    whole or converted to a cache; rows are read as they are iterated)."""
    from datasets import load_dataset

    return iter(
        load_dataset(path, config, split=split, data_files=data_files, revision=revision, streaming=True)
    )


def _load_folder(path: Path) -> list[str]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(_SUFFIXES))
    if not files:
        raise DataSourceError(f"folder {path} has no {'/'.join(_SUFFIXES)} files")
    return [text for file in files for text in _load_file(file)]


def _load_file(path: Path) -> list[str]:
    name = path.name.lower()
    if not name.endswith(_SUFFIXES):
        raise DataSourceError(f"{path}: unsupported file type (use {', '.join(_SUFFIXES)} or a folder)")
    try:
        raw = path.read_bytes()
        if name.endswith(".gz"):
            raw = gzip.decompress(raw)
        content = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataSourceError(f"cannot read {path}: {exc}") from exc
    if not content.strip():
        raise DataSourceError(f"{path} is empty")
    if name.endswith(".txt"):
        return [content]
    if content.lstrip().startswith("["):  # a .json array of records rather than JSON lines
        records = enumerate(_parse_json(path, content, "file"), start=1)
        return _texts_of(path, records, "record")
    lines = ((n, line) for n, line in enumerate(content.splitlines(), start=1) if line.strip())
    return _texts_of(path, ((n, _parse_json(path, line, f"line {n}")) for n, line in lines), "line")


def _parse_json(path: Path, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"{path} {where}: not valid JSON ({exc.msg})") from exc


def _texts_of(path: Path, records: Any, unit: str) -> list[str]:
    texts = []
    for n, record in records:
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataSourceError(f'{path} {unit} {n}: no "text" string field')
        texts.append(record["text"])
    return texts
