"""Decoding slot probabilities: presence first for presence slots, argmax elsewhere."""
import numpy as np
import pytest

from likeness.backend.predict import choose_option
from likeness.backend.schema import load_pack
from test_schema import write_pack


@pytest.fixture
def pack(tmp_path):
    return load_pack(write_pack(tmp_path))


@pytest.mark.parametrize("p, want", [
    ([0.40, 0.35, 0.25], "round"),     # P(none) 0.40 < 0.5: glasses present, likeliest pair wins
    ([0.55, 0.40, 0.05], "none"),
    ([0.20, 0.30, 0.50], "shades"),
])
def test_presence_slot_decides_presence_first(pack, p, want):
    slot = pack.slot("glasses")
    assert slot.options[choose_option(slot, np.array(p))].id == want


def test_other_slots_use_argmax(pack):
    slot = pack.slot("hair")                      # tags are hair_length, not presence
    assert slot.options[choose_option(slot, np.array([0.6, 0.4]))].id == "bald"
