"""The converter's exception: bad input to a conversion, raised before any file is written."""
from __future__ import annotations

from anemll_fast.errors import AnemllError


class ConvertError(AnemllError, ValueError):
    """A conversion request is invalid (architecture, checkpoint, sizes, options); the message names the culprit."""
