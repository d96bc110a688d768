"""stages/common/redact.py: credentials in URIs never reach a log, a tracking server, an asset key or --json output.

Hand-made cases: each input with the exact text that may be shown.
"""

from __future__ import annotations

import pytest

from stages.common.redact import redact_credentials

CASES = [
    # user and password: the user stays (it says which account), the password goes
    ("postgresql://mlflow:hunter2@db.example:5432/mlflow", "postgresql://mlflow:***@db.example:5432/mlflow"),
    ("postgresql+psycopg2://u:p@localhost/db", "postgresql+psycopg2://u:***@localhost/db"),
    ("s3://AKIAEXAMPLE:wJalr%2FK7MDENG@bucket/prefix", "s3://AKIAEXAMPLE:***@bucket/prefix"),
    ("http://u:p@host", "http://u:***@host"),
    ("https://admin:pa:ss@mlflow.internal:5000/", "https://admin:***@mlflow.internal:5000/"),
    ("redis://:only-a-password@cache:6379/0", "redis://:***@cache:6379/0"),
    ("mysql://u:p@ss@host/db", "mysql://u:***@host/db"),  # an unescaped @ in the password: up to the last one
    # a lone user part is a token more often than a name (https://ghp_xxx@github.com)
    ("https://ghp_abcdef123@github.com/org/repo", "https://***@github.com/org/repo"),
    ("gs://ya29.token@bucket/x", "gs://***@bucket/x"),
    # credentials in the query string
    ("https://h.example/x?token=abc&page=2", "https://h.example/x?token=***&page=2"),
    ("s3://b/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA%2F2024", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("postgresql://h/db?user=u&password=secret", "postgresql://h/db?user=u&password=***"),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=abc%3D", "https://acct.blob.core.windows.net/c?sv=2022&sig=***"),
    # inside a sentence, more than one, and in JSON text
    ("no answer from http://u:secret@127.0.0.1:9 (refused); tracking is off",
     "no answer from http://u:***@127.0.0.1:9 (refused); tracking is off"),
    ("copy s3://a:b@x/1 to gs://c:d@y/2", "copy s3://a:***@x/1 to gs://c:***@y/2"),
    ('{"store": "s3://k:s@b/p", "n": 1}', '{"store": "s3://k:***@b/p", "n": 1}'),
    ("'memory://u:pw@x/store'", "'memory://u:***@x/store'"),
    # nothing to hide: unchanged
    ("s3://bucket/prefix/sft-model", "s3://bucket/prefix/sft-model"),
    ("file:///home/u/artifacts", "file:///home/u/artifacts"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("/abs/path/with@sign/x", "/abs/path/with@sign/x"),
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ("mail me at someone@example.com", "mail me at someone@example.com"),
    ("https://h.example/x?page=2&key_size=3", "https://h.example/x?page=2&key_size=3"),
    ("https://host/path/user@example.com", "https://host/path/user@example.com"),  # an @ after the host is a path
    ("", ""),
]


@pytest.mark.parametrize(("text", "shown"), CASES, ids=[c[0][:40] or "empty" for c in CASES])
def test_redact_credentials(text, shown):
    assert redact_credentials(text) == shown
    assert redact_credentials(shown) == shown  # idempotent: redacting twice shows the same


def test_redact_credentials_takes_any_value():
    assert redact_credentials(None) == "None"
    assert redact_credentials(3) == "3"
