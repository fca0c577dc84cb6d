"""Reading the small text files that come with a model (meta.yaml, configs,
templates): a file that is not UTF-8 is an error naming the file and the byte."""
from __future__ import annotations

from pathlib import Path
from typing import Type, Union


def read_utf8(path: Union[str, Path], error: Type[Exception]) -> str:
    """The text of `path`; `error` (naming the file) when it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
