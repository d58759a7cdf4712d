"""Word material for needles: RULER-style ``adjective-noun`` keys and random codes."""

from __future__ import annotations

import random
import string
import uuid

ADJECTIVES = (
    "abundant", "agreeable", "amused", "ancient", "anxious", "bitter", "blushing", "brave",
    "breezy", "brittle", "bumpy", "calm", "careful", "cheerful", "chilly", "clumsy", "cloudy",
    "colossal", "crooked", "curious", "damp", "dazzling", "delicate", "dusty", "eager",
    "elegant", "empty", "fancy", "fearless", "fierce", "fluffy", "fragile", "frantic", "fuzzy",
    "gentle", "gigantic", "glossy", "graceful", "grumpy", "hollow", "humble", "icy", "jolly",
    "juicy", "lazy", "little", "lively", "lonely", "lucky", "magnificent", "mellow", "misty",
    "modern", "muddy", "narrow", "nervous", "noisy", "obedient", "odd", "orange", "patient",
    "plain", "polite", "proud", "purple", "quaint", "quiet", "rapid", "rustic", "scary",
    "shaggy", "shiny", "silent", "silly", "sleepy", "slimy", "smoky", "sparkling", "spicy",
    "splendid", "steady", "sticky", "stormy", "sturdy", "tame", "tender", "thirsty", "tidy",
    "tiny", "vast", "violet", "wandering", "wicked", "witty", "wooden", "zealous",
)
NOUNS = (
    "acorn", "anchor", "apple", "badger", "balloon", "banjo", "barrel", "beacon", "beetle",
    "bicycle", "blanket", "bottle", "bucket", "button", "cabbage", "camera", "candle", "canyon",
    "carpet", "castle", "cactus", "cherry", "chimney", "cobbler", "comet", "compass", "cookie",
    "cricket", "crystal", "dolphin", "dragon", "drum", "engine", "falcon", "feather", "fiddle",
    "forest", "fountain", "gadget", "garden", "giraffe", "glacier", "goblet", "hammer",
    "harbor", "helmet", "honey", "igloo", "island", "jacket", "jungle", "kettle", "kitten",
    "ladder", "lantern", "lemon", "lizard", "magnet", "meadow", "mitten", "monkey", "muffin",
    "needle", "noodle", "otter", "paddle", "parrot", "pebble", "pepper", "piano", "pillow",
    "planet", "pocket", "pumpkin", "puzzle", "rabbit", "radish", "ribbon", "rocket", "saddle",
    "scarf", "shovel", "spider", "sponge", "squirrel", "teapot", "thimble", "tiger", "tomato",
    "trumpet", "tulip", "turtle", "umbrella", "violin", "wagon", "walrus", "whistle", "zebra",
)


def random_keys(rng: random.Random, count: int, forbidden: str = "") -> list[str]:
    """``count`` keys ``adjective-noun``, none inside another or in ``forbidden``."""
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in forbidden and not any(key in k or k in key for k in keys):  # icy/spicy
            keys.append(key)
    return keys


def random_numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` distinct random numbers of exactly ``digits`` digits, as strings."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    return [str(n) for n in rng.sample(range(low, high + 1), count)]


def random_names(rng: random.Random, count: int, length: int = 5) -> list[str]:
    """``count`` distinct random upper-case variable names."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        if name not in names:
            names.append(name)
    return names


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID string drawn from ``rng`` (not from the OS)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
