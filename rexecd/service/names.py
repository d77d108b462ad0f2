"""Generated container names of the form ``adj-noun-NN``, from rexecd's own word lists."""

from __future__ import annotations

import random
from collections.abc import Container

from rexecd.errors import Conflict

# Short, plain, inoffensive words, lower-case ASCII only, so every generated name
# is a valid container name and easy to type.
ADJECTIVES: tuple[str, ...] = (
    "amber", "ancient", "autumn", "bold", "brave", "breezy", "bright", "calm", "clever",
    "cosmic", "crisp", "curious", "dapper", "daring", "dusty", "eager", "early", "electric",
    "fancy", "fast", "fluffy", "frosty", "gentle", "giant", "golden", "happy", "hidden",
    "humble", "icy", "jolly", "keen", "kind", "lively", "lucky", "lunar", "mellow", "merry",
    "misty", "modest", "nimble", "noble", "patient", "plucky", "polar", "proud", "quick",
    "quiet", "rapid", "rustic", "shiny", "silent", "silver", "sleepy", "smooth", "snowy",
    "solar", "spry", "steady", "sunny", "swift", "tidy", "vivid", "warm", "witty",
)  # fmt: skip

NOUNS: tuple[str, ...] = (
    "anchor", "badger", "beacon", "bison", "canyon", "cedar", "comet", "coral", "crane",
    "delta", "dolphin", "ember", "falcon", "fern", "fjord", "forest", "fox", "galaxy",
    "glacier", "harbor", "hawk", "heron", "island", "jaguar", "kestrel", "lagoon", "lantern",
    "lark", "maple", "meadow", "meteor", "mountain", "nebula", "oak", "orbit", "otter",
    "owl", "panda", "pebble", "pine", "planet", "prairie", "quartz", "raven", "reef", "river",
    "rocket", "sparrow", "spruce", "storm", "summit", "sun", "thunder", "tiger", "tundra",
    "valley", "walrus", "willow", "wolf", "yak", "zebra", "breeze", "cloud", "harvest",
)  # fmt: skip

_ATTEMPTS = 200
_default_rng = random.Random()


def generate_name(rng: random.Random | None = None, taken: Container[str] = frozenset()) -> str:
    """A name like ``swift-otter-42`` that is not in ``taken``.

    NN runs 10-99 so the suffix is always two digits. With over 360 000
    combinations a clash is rare; after many clashes (a user with a great many
    containers) the suffix widens to four digits rather than failing.
    """
    rng = rng or _default_rng
    for low, high in ((10, 99), (1000, 9999)):
        for _ in range(_ATTEMPTS):
            name = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}-{rng.randint(low, high)}"
            if name not in taken:
                return name
    raise Conflict("could not find a free generated container name; give a name")
