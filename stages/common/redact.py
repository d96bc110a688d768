"""Credentials out of anything shown or stored: a URI's password (`postgresql://user:***@host`, `s3://key:***@bucket`),
a lone user part, which is a token more often than a name (`https://***@github.com`), and the credential fields of a
query string (`?token=***`, `X-Amz-Signature=***`, `sig=***`).

The store, the tracking server and the work dir keep their real URIs (they need them to connect); only what leaves
for a person or another system goes through `redact_credentials`: MLflow params and tags, Prefect asset keys,
warnings, error lines and `--json` output. It works on free text (an error message, a JSON document), so a URI
inside a sentence is redacted too, and redacting twice shows the same.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://NETLOC: the netloc runs to the first / ? # or a character that ends a URI in text (RFC 3986: a / in a
# password must be percent-encoded); the userinfo is everything before its last @, as urllib.parse reads it.
_NETLOC = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<netloc>[^/?#\s'\"<>`]*)")
_QUERY_SECRETS = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|pass|secret|client_secret|token|access_token|refresh_token|id_token"
    r"|api[_-]?key|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|aws_secret_access_key"
    r"|aws_session_token|sas_token)=)(?P<value>[^&#;\s'\"<>`]*)",
    re.IGNORECASE,
)


def _netloc(match: re.Match[str]) -> str:
    userinfo, at, host = match["netloc"].rpartition("@")
    if not at:
        return match[0]
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:{MASK}" if colon else MASK
    return f"{match['scheme']}{shown}@{host}"


def redact_credentials(text: object) -> str:
    """`text` (any value, as str) with every URI's password, lone user part and query-string credential masked."""
    text = str(text)
    if "://" not in text and "=" not in text:
        return text
    text = _NETLOC.sub(_netloc, text)
    return _QUERY_SECRETS.sub(lambda m: m["key"] + (m["value"] and MASK), text)


__all__ = ["MASK", "redact_credentials"]
