"""Redaction of secrets before anything reaches MLflow, a log, an artifact or the console.

Rules, applied recursively to mappings, sequences and strings:

* a value whose *key* names a secret is replaced by ``REDACTED`` whatever it is. A key names a
  secret when one of its words (split at ``_ - .`` and camelCase) is ``token``, ``secret``,
  ``password``/``passwd``/``pwd``, ``credential(s)``, ``auth``, ``apikey`` or ``passphrase``, or
  two adjacent words are ``api key``, ``private key``, ``access key`` or ``secret key``. Whole
  words only: ``max_new_tokens`` or ``sft.average_tokens_across_devices`` are not secrets, and
  neither are the special-token names (``pad_token``, ``eos_token``...) nor keys where ``token`` is
  followed by another word (``mean_token_accuracy``, ``token_id``), unless that word is ``value``,
  ``secret``, ``key`` or ``str(ing)``;
* inside any string: Hugging Face tokens (``hf_...``), bearer tokens, the password of a URI in
  every form (``scheme://user:pw@host``, ``scheme:/user:pw@host`` as the datasets library
  rewrites it, ``user:pw@host``), query-string secrets (``?token=...``, ``&sig=...``), and
  ``KEY=value`` / ``KEY: value`` / ``--key value`` with a secret KEY are masked;
* every value ever seen under a secret key (by :func:`redact`) and the value of every secret
  environment variable (``HF_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``...) is masked wherever it
  appears in a string, in any form of text (values shorter than 6 characters are not tracked).

:func:`redacting_console` masks what a stage prints (``sys.stdout``/``sys.stderr`` and logging
handlers on them) and installs an excepthook that prints redacted tracebacks.
"""

from __future__ import annotations

import contextlib
import copyreg
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

REDACTED = "***REDACTED***"
MIN_SECRET_LEN = 6  # shorter values under a secret key are masked by key only, not searched for in text

_SECRET_WORDS = {"token", "secret", "secrets", "password", "passwords", "passwd", "pwd", "credential",
                 "credentials", "auth", "apikey", "passphrase"}
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key")}
_SPECIAL_TOKENS = {"pad", "bos", "eos", "unk", "sep", "cls", "mask"}  # <pad_token> etc. name tokenizer symbols
# after "token", these words make the key a secret's name still (hub_token_value); any other word makes
# it a quantity or property of text tokens (mean_token_accuracy, token_id, token_count), not a credential
_TOKEN_SECRET_TAILS = {"value", "secret", "key", "str", "string"}
_NOT_SECRETS = {"PWD"}  # the shell's working directory, not a password: masking it hid every path in the logs
_QUERY_SECRETS = {"key", "sig", "signature", "code", "x-amz-signature", "x-amz-credential",
                  "x-amz-security-token"}

_known: set[str] = set()  # values seen under a secret key
_known_lock = threading.Lock()


def _words(key: str) -> list[str]:
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key))
    return [w for w in re.split(r"[^A-Za-z0-9]+", key.lower()) if w]


def is_secret_key(key: str) -> bool:
    """True when a config/environment/query key names a secret (whole words, see module doc)."""
    if str(key) in _NOT_SECRETS:
        return False
    words = _words(key)
    for i, word in enumerate(words):
        if word in _SECRET_WORDS:
            if word == "token" and i > 0 and words[i - 1] in _SPECIAL_TOKENS:
                continue
            if word == "token" and any(w not in _TOKEN_SECRET_TAILS for w in words[i + 1:]):
                continue
            return True
        if i + 1 < len(words) and (word, words[i + 1]) in _SECRET_PAIRS:
            return True
    return False


def remember_secret(value: Any) -> None:
    """Mask ``value`` wherever it appears in text from now on (in this process)."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_LEN and value != REDACTED:
        with _known_lock:
            _known.add(value)


def _secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if len(v) >= MIN_SECRET_LEN and is_secret_key(k)}
    with _known_lock:
        values |= _known
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another


def _keyed(match: re.Match) -> str:
    if not is_secret_key(match.group("k")):
        return match.group(0)
    return match.group(0)[: match.start("v") - match.start(0)] + REDACTED


_TEXT_PATTERNS: list[tuple[re.Pattern, Any]] = [
    (re.compile(r"hf_[A-Za-z0-9]{16,}"), REDACTED),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
    # scheme://user:pw@host, scheme:/user:pw@host (datasets rewrites '://'): any host
    (re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.-]*:/{1,3}[^\s:/@'\"`]*):(?P<pw>[^\s@/'\"`]+)@(?=[\w\[.-])"),
     r"\g<pre>:" + REDACTED + "@"),
    # user:pw@host without a scheme: only where the host looks like one (a dotted name or address,
    # localhost, [ipv6]), so ids such as ``guard:<model>@<fingerprint>`` are not mistaken for it
    (re.compile(r"(?P<pre>(?<![\w.+-])[^\s:/@'\"`]+):(?P<pw>[^\s@/'\"`]+)@"
                r"(?=(?:localhost\b|\[[0-9A-Fa-f:]+\]|[\w-]+(?:\.[\w-]+)+))"),
     r"\g<pre>:" + REDACTED + "@"),
    # query strings: ?token=..&sig=..
    (re.compile(r"(?P<sep>[?&;])(?P<k>[^=&#\s?;]+)=(?P<v>[^&#\s'\"`]+)"),
     lambda m: m.group(0) if not (is_secret_key(m.group("k")) or m.group("k").lower() in _QUERY_SECRETS)
     else f"{m.group('sep')}{m.group('k')}={REDACTED}"),
    # KEY=value, KEY: value, 'key': 'value', --key=value
    (re.compile(r"(?P<k>[A-Za-z_][A-Za-z0-9_.-]*)['\"]?\s*[=:]\s*['\"]?(?P<v>[^\s'\",;)}\]]+)"), _keyed),
    # --key value (command lines)
    (re.compile(r"--(?P<k>[A-Za-z_][A-Za-z0-9_.-]*)\s+['\"]?(?P<v>[^\s'\"]+)"), _keyed),
]


def redact_text(text: str) -> str:
    """Mask secrets inside free text (error messages, URIs, command lines, console output)."""
    for value in _secret_values():
        if value in text:
            text = text.replace(value, REDACTED)
    for pattern, repl in _TEXT_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact(obj: Any, key: str | None = None) -> Any:
    """Return a copy of ``obj`` with every secret masked (see the module docstring)."""
    if key is not None and is_secret_key(key) and obj not in (None, "", False):
        remember_secret(obj)
        return REDACTED
    if isinstance(obj, Mapping):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


# ---------------------------------------------------------------------------------- console
class RedactingStream:
    """A text stream that masks secrets in every ``write`` before passing it on."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text) if isinstance(text, str) else text)
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _redacting_excepthook(exc_type, exc, tb) -> None:
    sys.__stderr__.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))


def install_excepthook() -> None:
    """Print uncaught tracebacks redacted (a stage's error escapes its run and reaches the console)."""
    sys.excepthook = _redacting_excepthook


@contextlib.contextmanager
def redacting_console() -> Iterator[None]:
    """Mask secrets in what is written to ``sys.stdout``/``sys.stderr`` (and logging handlers that
    write there) inside the block; restore the streams after it."""
    install_excepthook()
    old = {"stdout": sys.stdout, "stderr": sys.stderr}
    wrapped = {name: RedactingStream(s) for name, s in old.items()}
    handlers = [h for logger in [logging.getLogger(), *logging.root.manager.loggerDict.values()]
                for h in getattr(logger, "handlers", []) if type(h) is logging.StreamHandler]
    moved = []
    for handler in handlers:
        for name, stream in old.items():
            if handler.stream is stream:
                moved.append((handler, stream))
                handler.setStream(wrapped[name])
    sys.stdout, sys.stderr = wrapped["stdout"], wrapped["stderr"]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old["stdout"], old["stderr"]
        for handler, stream in moved:
            handler.setStream(stream)


# ---------------------------------------------------------------------------------- pickles
def redact_when_pickled(obj: Any) -> Any:
    """Make every pickle (and copy) of ``obj`` carry redacted field values; ``obj`` itself keeps its
    real values and class. The Trainer ``torch.save``-s its TrainingArguments as ``training_args.bin``
    next to every checkpoint and the final adapter: with this, a ``hub_token`` or a password in any
    field never reaches that file, and ``torch.load`` still returns the original class."""
    base = type(obj)
    if getattr(base, "_sst_lab_redacted_pickle", False):
        return obj

    def __reduce_ex__(self, protocol):  # noqa: N807 - the pickle protocol's name
        state = {k: redact(v, k) for k, v in vars(self).items()}
        return (copyreg._reconstructor, (base, object, None), state)  # loads as ``base``, no sst-lab import

    obj.__class__ = type(base.__name__, (base,), {"__reduce_ex__": __reduce_ex__, "_sst_lab_redacted_pickle": True,
                                                  "__module__": base.__module__, "__qualname__": base.__qualname__})
    return obj

