"""Generated container names: format, determinism with an injected RNG, avoiding taken names."""

from __future__ import annotations

import random
import re

import pytest

from rexecd.errors import Conflict
from rexecd.models import NAME_RE
from rexecd.service import names
from rexecd.service.names import ADJECTIVES, NOUNS, generate_name


def test_format_and_validity() -> None:
    rng = random.Random(1)
    for _ in range(500):
        name = generate_name(rng)
        assert re.fullmatch(r"[a-z]+-[a-z]+-[1-9][0-9]", name), name
        assert NAME_RE.match(name)


def test_deterministic_with_seeded_rng() -> None:
    assert generate_name(random.Random(42)) == generate_name(random.Random(42))
    seq_a = [generate_name(rng) for rng in [random.Random(7)] for _ in range(5)]
    rng = random.Random(7)
    assert seq_a == [generate_name(rng) for _ in range(5)]


def test_word_lists_are_clean() -> None:
    for words in (ADJECTIVES, NOUNS):
        assert len(words) == len(set(words)) >= 50
        assert all(re.fullmatch(r"[a-z]+", w) for w in words)


def test_avoids_taken_names() -> None:
    first = generate_name(random.Random(3))
    assert generate_name(random.Random(3), taken={first}) != first


class _Everything:
    def __contains__(self, item: object) -> bool:
        return True


class _AllTwoDigit:
    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and re.search(r"-\d\d$", item) is not None


def test_widens_suffix_then_gives_up() -> None:
    name = generate_name(random.Random(0), taken=_AllTwoDigit())
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d{4}", name)
    with pytest.raises(Conflict):
        generate_name(random.Random(0), taken=_Everything())


def test_default_rng_is_used() -> None:
    names._default_rng.seed(5)
    a = generate_name()
    names._default_rng.seed(5)
    assert generate_name() == a
