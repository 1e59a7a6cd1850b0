"""Redaction of secrets before anything reaches MLflow, a log or an artifact.

Two rules, applied recursively to mappings, sequences and strings:

* a value whose *key* looks secret (``token``, ``secret``, ``password``, ``api_key``,
  ``credential``, ``auth``, ``private_key``) is replaced by ``REDACTED`` whatever it is;
* inside any string, Hugging Face tokens (``hf_...``), bearer tokens, the password part of a
  ``scheme://user:password@host`` URI and ``KEY=value`` pairs with a secret-looking KEY are masked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"

_SECRET_KEY = re.compile(r"(token|secret|passw(or)?d|api[_-]?key|credential|auth(?!or)|private[_-]?key)", re.I)
# Keys that contain a secret-looking word but are not secrets.
_NOT_SECRET_KEYS = {"pad_token", "bos_token", "eos_token", "unk_token", "max_new_tokens", "num_tokens",
                    "tokenizer_name_or_path", "max_tokens", "tokens_per_second", "trust_remote_code"}

_TEXT_PATTERNS = [
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}\b"), REDACTED),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
    (re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@"),
     r"\g<scheme>\g<user>:" + REDACTED + "@"),
    (re.compile(r"(?i)\b([A-Z0-9_]*(TOKEN|SECRET|PASSWORD|API_KEY|APIKEY|CREDENTIALS?)[A-Z0-9_]*)=(\S+)"),
     r"\1=" + REDACTED),
]


def is_secret_key(key: str) -> bool:
    """True when a config/environment key names a secret."""
    k = str(key).rsplit(".", 1)[-1].lower()
    if k in _NOT_SECRET_KEYS or k.endswith("_tokens") or k.startswith("num_"):
        return False
    return bool(_SECRET_KEY.search(k))


def redact_text(text: str) -> str:
    """Mask secrets inside free text (error messages, URIs, command lines)."""
    for pattern, repl in _TEXT_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact(obj: Any, key: str | None = None) -> Any:
    """Return a copy of ``obj`` with every secret masked (see the module docstring)."""
    if key is not None and is_secret_key(key) and obj not in (None, "", False):
        return REDACTED
    if isinstance(obj, Mapping):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
