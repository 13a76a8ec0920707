"""Offline text domains for language models: corpora, a BPE tokenizer trained in code, token blocks.

| name    | source                                                          | size (chars) |
| ------- | --------------------------------------------------------------- | ------------ |
| english | Debian ``fortunes`` (``/usr/share/games/fortunes``, no ASCII art) | ~2.5M        |
| german  | Debian ``fortunes-de`` (``.../fortunes/de``, no ASCII art)       | ~2.9M        |
| python  | the running interpreter's standard library, without tests        | ~12M         |

A *document* is one fortune (the files separate them with ``%`` lines) or one ``.py`` file. Documents
are assigned to ``"train"`` or ``"test"`` by a CRC32 of their identifier (file path, and the fortune's
index within its file), so the split is the same on every machine and load (about ``TEST_FRACTION``
of the documents are held out).

Batches are tuples ``(input_ids, labels)`` of int64 tensors of shape (N, T), the Hugging Face
convention: ``labels[i, t]`` is the token at position t (the model at position t predicts
``labels[i, t + 1]``; the shift happens in the loss) and ``IGNORE_INDEX`` (-100) where the position
is padding, whose ``input_ids`` hold the tokenizer's ``PAD`` token.

The tokenizer is byte-level BPE (``tokenizers``), trained deterministically on the train splits of
the given corpora (the first ``chars_per_corpus`` characters of each, documents in their fixed
order) and cached as JSON under ``cache_dir`` (key: vocabulary size, corpora, character budget and a
CRC32 of the training text).
"""
from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

FORTUNES_DIR = os.environ.get("SOPHON_FAST_FORTUNES_DIR", "/usr/share/games/fortunes")
CORPORA = ("english", "german", "python")
IGNORE_INDEX = -100
EOS = "<|endoftext|>"
PAD = "<|pad|>"
TEST_FRACTION = 0.1
_ASCII_ART = {"art", "ascii-art", "asciiart"}
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


class CorpusUnavailable(RuntimeError):
    """A corpus's files are missing (e.g. the Debian package is not installed)."""


def _fortune_files(folder: str, package: str) -> List[str]:
    if not os.path.isdir(folder):
        raise CorpusUnavailable(f"{folder} not found: install the Debian package {package!r} "
                                f"(apt-get install {package}) or set SOPHON_FAST_FORTUNES_DIR")
    names = sorted(f for f in os.listdir(folder)
                   if "." not in f and f not in _ASCII_ART and os.path.isfile(os.path.join(folder, f)))
    if not names:
        raise CorpusUnavailable(f"{folder} holds no fortune files (package {package!r})")
    return [os.path.join(folder, f) for f in names]


def _fortunes(files: Sequence[str]) -> List[Tuple[str, str]]:
    docs = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts = f.read().split("\n%\n")
        name = os.path.basename(path)
        docs += [(f"{name}:{i}", p.strip("%\n") + "\n") for i, p in enumerate(parts) if p.strip("%\n").strip()]
    return docs


def _python_stdlib() -> List[Tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test_"):
                path = os.path.join(folder, f)
                with open(path, encoding="utf-8", errors="replace") as fh:
                    source = fh.read()
                if source.strip():   # empty __init__.py files are no documents
                    docs.append((os.path.relpath(path, root), source))
    if not docs:
        raise CorpusUnavailable(f"no Python sources found under {root}")
    return docs


@functools.lru_cache(maxsize=None)
def documents(name: str) -> Tuple[Tuple[str, str], ...]:
    """Every distinct ``(identifier, text)`` document of corpus ``name``, in a fixed order (a text
    seen before is dropped, so no text is in both splits). Read once per process (cached).

    Raises ``ValueError`` for an unknown name and :class:`CorpusUnavailable` when its files are missing.
    """
    if name == "english":
        docs = _fortunes(_fortune_files(FORTUNES_DIR, "fortunes"))
    elif name == "german":
        docs = _fortunes(_fortune_files(os.path.join(FORTUNES_DIR, "de"), "fortunes-de"))
    elif name == "python":
        docs = _python_stdlib()
    else:
        raise ValueError(f"unknown text corpus {name!r}; one of {CORPORA}")
    seen = set()
    return tuple((ident, t) for ident, t in docs if not (t in seen or seen.add(t)))


def _is_test(identifier: str) -> bool:
    return zlib.crc32(identifier.encode()) % 1000 < TEST_FRACTION * 1000


def texts(name: str, split: str, max_chars: Optional[int] = None) -> List[str]:
    """The texts of corpus ``name``'s ``split`` ("train" | "test"), in the fixed document order,
    stopping before ``max_chars`` characters are exceeded (None: all; at least one document)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    out, total = [], 0
    for ident, text in documents(name):
        if _is_test(ident) != (split == "test"):
            continue
        if max_chars is not None and out and total + len(text) > max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def _cache_path(cache_dir: Optional[str], key: str) -> Optional[str]:
    return None if cache_dir is None else os.path.join(cache_dir, key)


def train_tokenizer(vocab_size: int = 4096, corpora: Sequence[str] = CORPORA, chars_per_corpus: int = 2_000_000,
                    cache_dir: Optional[str] = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` tokens, trained on the train splits.

    Special tokens: ``EOS`` (id 0, appended to every document) and ``PAD`` (id 1). Deterministic: the
    same arguments give the same vocabulary and merges. With ``cache_dir`` the trained tokenizer is
    saved there as JSON and reused. Raises ``ValueError`` for ``vocab_size`` below 256 + 2 (every byte
    plus the special tokens) or an empty ``corpora``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + EOS + PAD), got {vocab_size}")
    if not corpora:
        raise ValueError("train_tokenizer: corpora is empty")
    training = [t for c in corpora for t in texts(c, "train", chars_per_corpus)]
    crc = 0
    for t in training:
        crc = zlib.crc32(t.encode("utf-8", errors="replace"), crc)
    path = _cache_path(cache_dir, f"bpe-v{vocab_size}-{'-'.join(corpora)}-c{chars_per_corpus}-{crc:08x}.json")
    if path is not None and os.path.exists(path):
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training, trainer=trainer, length=len(training))
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        tok.save(tmp)
        os.replace(tmp, path)
    return tok


def special_ids(tokenizer) -> Tuple[int, int]:
    """``(eos_id, pad_id)`` of ``tokenizer``; raises ``ValueError`` when it lacks ``EOS`` or ``PAD``."""
    eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    if eos is None or pad is None:
        raise ValueError(f"the tokenizer needs the special tokens {EOS!r} and {PAD!r} (see train_tokenizer)")
    return eos, pad


def encode_blocks(docs: Sequence[str], tokenizer, block_size: int = 128,
                  max_blocks: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Tokenise ``docs``, join them with ``EOS`` after each, and cut the stream into blocks.

    Returns ``(input_ids, labels)``, both int64 (N, block_size) on the CPU: every block is full except
    the last, whose tail holds ``PAD`` in ``input_ids`` and ``IGNORE_INDEX`` in ``labels``; elsewhere
    ``labels == input_ids``. ``max_blocks`` keeps the first blocks only. Raises ``ValueError`` for
    ``block_size < 2``, ``max_blocks < 1`` or no tokens at all.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a block predicts its next tokens), got {block_size}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    eos, pad = special_ids(tokenizer)
    ids: List[int] = []
    limit = None if max_blocks is None else max_blocks * block_size
    chunk: List[str] = []
    for i, doc in enumerate(docs):   # in chunks of ~64k characters, so that max_blocks stops early
        chunk.append(doc)
        if sum(map(len, chunk)) < 65536 and i + 1 < len(docs):
            continue
        for enc in tokenizer.encode_batch(chunk):
            ids += enc.ids
            ids.append(eos)
        chunk = []
        if limit is not None and len(ids) >= limit:
            break
    if not ids:
        raise ValueError("encode_blocks: no tokens (empty documents)")
    return pack_blocks(ids[:limit] if limit is not None else ids, block_size, pad)


def pack_blocks(ids: Sequence[int], block_size: int, pad: int) -> Tuple[Tensor, Tensor]:
    """A token stream cut into (N, block_size) blocks: ``(input_ids, labels)``, the last block padded with ``pad``
    and labels ``IGNORE_INDEX`` there."""
    stream = torch.tensor(list(ids), dtype=torch.int64)
    n = -(-stream.numel() // block_size)
    input_ids = torch.full((n * block_size,), pad, dtype=torch.int64)
    input_ids[:stream.numel()] = stream
    labels = input_ids.clone()
    labels[stream.numel():] = IGNORE_INDEX
    return input_ids.view(n, block_size), labels.view(n, block_size)


def load(name: str, split: str, tokenizer, block_size: int = 128, max_blocks: Optional[int] = None,
         max_chars: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``encode_blocks(texts(name, split, max_chars), tokenizer, block_size, max_blocks)``: the
    ``(input_ids, labels)`` int64 (N, block_size) tensors of one corpus split."""
    return encode_blocks(texts(name, split, max_chars), tokenizer, block_size, max_blocks)


def available() -> List[str]:
    """The corpora whose files are present on this machine."""
    out = []
    for name in CORPORA:
        try:
            documents(name)
        except CorpusUnavailable:
            continue
        out.append(name)
    return out
