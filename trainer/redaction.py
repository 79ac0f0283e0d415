"""Keep credentials out of everything Tessera writes: MLflow params, tags, run names, logs, reports.

Two rules, both narrow so real settings stay visible:

- by key: a value is hidden when the last component of its dotted key names a credential as a whole
  word (``store.secret_key``, ``hf_token``, ``aws_secret_access_key``, ``password``), never when a
  credential word is only part of a longer word (``data.tokenizer``, ``model.moe.drop_tokens``);
- by shape: credential-shaped text is cut out of any value (AWS key ids, ``user:password@`` in URLs,
  bearer tokens, GitHub/Hugging Face tokens), and so are the values of credential environment
  variables (``AWS_SECRET_ACCESS_KEY``...) wherever they show up.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "***REDACTED***"

# The whole last key component (lower-cased, split on "."), optionally after a prefix ending in "_"/"-".
CREDENTIAL_KEY = re.compile(
    r"(?:^|.*[_-])(?:password|passwd|passphrase|secret|token|credentials?"
    r"|(?:secret|api|access|private|signing|encryption|client|account)[_-]?key"
    r"|(?:access|refresh|auth|bearer|session|id|api)[_-]?token|client[_-]?secret)$"
)
CREDENTIAL_VALUES = (
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"(?i)\bbearer\s+[a-z0-9._~+/=-]+"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in URLs
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub tokens
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face tokens
)
# ``secret_key=...``, ``--password ...`` in a command line or free text.
ASSIGNMENT = re.compile(r"(?P<key>[A-Za-z0-9_.-]+)(?P<sep>=|:\s*)(?P<value>[^\s,;&]+)")
MIN_ENV_SECRET_LENGTH = 6  # shorter env values are too likely to occur by chance in ordinary text


def is_credential_key(key: str) -> bool:
    """True when the last dotted component of ``key`` names a credential as a whole word."""
    return bool(CREDENTIAL_KEY.match(key.rsplit(".", 1)[-1].lower()))


def _environment_secrets() -> list[str]:
    """Values of credential environment variables, read at call time (tests and launchers change them)."""
    values = {
        value
        for name, value in os.environ.items()
        if is_credential_key(name) and len(value) >= MIN_ENV_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """Cut credential-shaped pieces, ``secret=...`` assignments and env secrets out of free text."""
    for secret in _environment_secrets():
        text = text.replace(secret, REDACTED)
    for pattern in CREDENTIAL_VALUES:
        text = pattern.sub(REDACTED, text)
    return ASSIGNMENT.sub(
        lambda m: f"{m['key']}{m['sep']}{REDACTED}" if is_credential_key(m["key"]) else m[0], text
    )


def redact_value(key: str, value: Any) -> Any:
    """Hide a value whose key names a credential; redact credential-shaped text in any other string."""
    if is_credential_key(key) and value not in (None, "", False):
        return REDACTED
    return redact_text(value) if isinstance(value, str) else value


def redact(data: Any, key: str = "") -> Any:
    """Recursively redact a nested structure (configs, reports) before it leaves the process."""
    if isinstance(data, Mapping):
        return {k: redact(v, str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v, key) for v in data]
    return redact_value(key, data)


def redact_command(argv: Sequence[str]) -> str:
    """A command line as one string, with ``--password X`` values and credential text hidden."""
    words: list[str] = []
    hide_next = False
    for word in argv:
        words.append(REDACTED if hide_next else redact_text(word))
        flag = word.lstrip("-").replace("-", "_")
        hide_next = word.startswith("--") and "=" not in word and is_credential_key(flag)
    return " ".join(words)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts every record's final message (for loggers we do not own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install_log_redaction(logger_name: str) -> None:
    """Attach a :class:`RedactingFilter` to each handler of ``logger_name`` (once)."""
    for handler in logging.getLogger(logger_name).handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
