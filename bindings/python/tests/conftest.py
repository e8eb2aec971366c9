"""Paths the tests need, from the environment meson's test sets (QKD_SOURCE,
QKD_SHARED, QKD_DISTILL_EXAMPLE, QKD_DISTILL_CPP_EXAMPLE) or found from
this file's place in the tree."""
import os
import sys

import pytest

SOURCE = os.environ.get("QKD_SOURCE") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SHARED = os.environ.get("QKD_SHARED") or os.path.join(SOURCE, "..", "shared")
sys.path.insert(0, os.path.join(SOURCE, "bindings", "python"))

MODEL = os.path.join(SHARED, "models", "stories260K", "stories260K.bin")
TOKENIZER = os.path.join(SHARED, "models", "stories260K", "tok512.bin")
TEXT = os.path.join(SHARED, "text", "tinystories", "TinyStories-valid.slice_My-AI_Tasks.txt")


@pytest.fixture
def stories():
    """(model, tokenizer, text) of stories260K; skipped without ../shared."""
    if not os.path.exists(MODEL):
        pytest.skip("no shared/models/stories260K")
    return MODEL, TOKENIZER, TEXT


@pytest.fixture
def ctx():
    import qkd
    with qkd.Context() as c:
        yield c
