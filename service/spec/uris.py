"""``file://`` URIs, read per RFC 8089, for every stage that accepts a local path.

``file:///abs/path``, ``file://localhost/abs/path`` and ``file:/abs/path`` name the local file
``/abs/path`` (percent-escapes decoded). Any other host is refused: ``file://runs/rel`` names the
file ``/rel`` on a host called ``runs``, which is never what its author meant (a relative path
is written without a scheme: ``runs/rel``), and silently writing to ``/rel`` lost outputs.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

LOCAL_HOSTS = ("", "localhost")


def file_uri_path(uri: str) -> str:
    """The local path a ``file:`` URI names. ValueError (one line, with the fix) otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"not a file: URI: {uri!r}")
    if parsed.netloc.lower() not in LOCAL_HOSTS:
        raise ValueError(
            f"{uri!r} names host {parsed.netloc!r}: a file URI is file:///absolute/path "
            "(RFC 8089); write a relative path without the scheme, e.g. "
            f"{(parsed.netloc + parsed.path)!r}"
        )
    if not parsed.path.startswith("/"):
        raise ValueError(f"{uri!r}: a file URI needs an absolute path (file:///absolute/path)")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{uri!r}: a file URI has no query or fragment ('?', '#')")
    return unquote(parsed.path)


def local_path_text(uri: str) -> str:
    """A local path or ``file:`` URI as the path it names (``~`` not yet expanded)."""
    return file_uri_path(uri) if urlparse(uri).scheme == "file" else uri
