"""Picture sizes written ``HxW`` (rows x columns, e.g. ``256x512``): the one rule for every option.

The model input of the worker, the size the gateway resizes frames to, the warm-up batch, and
the sizes of the training and export tools are all spelled and checked here. Both sides must be
multiples of 8 (the segmentation networks' output stride) within 8..4096.
"""

from __future__ import annotations

import argparse
from typing import Annotated

from pydantic import AfterValidator

MIN_SIDE = 8
MAX_SIDE = 4096
MULTIPLE = 8


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` as a (height, width) pair; ValueError, with a message for a person, otherwise."""
    try:
        h_text, w_text = text.lower().split("x")
        height, width = int(h_text), int(w_text)
    except ValueError:
        raise ValueError(f"size must look like HxW, e.g. 256x512; got {text[:40]!r}") from None
    for side in (height, width):
        if not MIN_SIDE <= side <= MAX_SIDE or side % MULTIPLE:
            raise ValueError(
                f"size {text!r}: height and width must be multiples of {MULTIPLE} "
                f"within {MIN_SIDE}..{MAX_SIDE}"
            )
    return height, width


def size_argument(text: str) -> tuple[int, int]:
    """`parse_size` for ``argparse``'s ``type=``: its message reaches the user as it is."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _checked(text: str) -> str:
    parse_size(text)
    return text


# A settings field holding an ``HxW`` text that `parse_size` accepts.
SizeText = Annotated[str, AfterValidator(_checked)]
