"""Reading the text files a user or an earlier stage wrote: UTF-8, with or without a BOM.

Editors on Windows save UTF-8 with a byte-order mark; read as plain UTF-8 it would become part
of the first line (a class named `'\\ufeffcat'`). Anything that is not UTF-8 (Latin-1, UTF-16,
a binary file given by mistake) is refused with the file and the first bad byte, never guessed:
a wrong guess would silently rename classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ecvl.errors import DataError

__all__ = ["decode_text", "read_json", "read_text", "shorten"]

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# What a message may quote of a value: enough to recognise it, never a megabyte of it.
SHOWN_CHARS = 200


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was (for error messages)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def decode_text(data: bytes, where: str) -> str:
    """`data` as text: UTF-8, a leading BOM dropped.

    Raises:
        DataError: the bytes are UTF-16 or not UTF-8; the message names `where` and the byte.
    """
    if data.startswith(_UTF16_BOMS):
        raise DataError(
            f"{where}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


def read_text(path: str | os.PathLike[str]) -> str:
    """The text of the file at `path` (see `decode_text`).

    Raises:
        DataError: not UTF-8 (see `decode_text`).
        OSError: the file cannot be read.
    """
    return decode_text(Path(path).read_bytes(), str(path))


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON document in the file at `path`.

    Raises:
        DataError: not UTF-8, or not valid JSON (the message names the file and the line).
        OSError: the file cannot be read.
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
