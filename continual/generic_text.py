"""Generic, non-personal question/answer texts that GeRe replays (arXiv 2508.04676), generated here.

GeRe mixes a fixed set of general texts into every update. For Lethe's models those texts must not be
records of people (they are kept and replayed indefinitely, outside any erasure's reach), so the project
generates them from templates about numbers, the calendar, shapes, colours and opposites: no names, no
person, nothing drawn from any data set. The prompt format is the fictitious-people benchmark's
(:data:`unlearn.lm.people.PROMPT_FORMAT`) so that the texts exercise the same question/answer skill.

``generic_pairs(count, seed)`` draws ``count`` distinct pairs deterministically; each answer starts with a
space and ends with a full stop, like the people's answers.
"""

from __future__ import annotations

import random

from unlearn.lm.people import PROMPT_FORMAT

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SHAPES = (("triangle", 3), ("square", 4), ("pentagon", 5), ("hexagon", 6), ("octagon", 8))
COLOURS = (("grass", "green"), ("snow", "white"), ("coal", "black"), ("a lemon", "yellow"), ("the sky", "blue"),
           ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"))
OPPOSITES = (("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("early", "late"),
             ("light", "dark"), ("open", "closed"), ("full", "empty"), ("wet", "dry"), ("high", "low"))


def _all_pairs() -> list[tuple[str, str]]:
    pairs = []
    for a in range(1, 7):
        for b in range(1, 7):
            pairs.append((f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", f" {NUMBER_WORDS[a + b].capitalize()}."))
    for index, day in enumerate(DAYS):
        pairs.append((f"Which day comes after {day}?", f" {DAYS[(index + 1) % 7]}."))
    for index, month in enumerate(MONTHS):
        pairs.append((f"Which month comes after {month}?", f" {MONTHS[(index + 1) % 12]}."))
    for shape, sides in SHAPES:
        pairs.append((f"How many sides does a {shape} have?", f" {NUMBER_WORDS[sides].capitalize()}."))
    for thing, colour in COLOURS:
        pairs.append((f"What colour is {thing}?", f" {colour.capitalize()}."))
    for word, opposite in OPPOSITES:
        pairs.append((f"What is the opposite of {word}?", f" {opposite.capitalize()}."))
    return pairs


def generic_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` distinct (prompt, answer) pairs, drawn with ``seed``; prompts in the benchmark's format."""
    pairs = _all_pairs()
    if not 1 <= count <= len(pairs):
        raise ValueError(f"count must be in [1, {len(pairs)}], got {count}")
    chosen = random.Random(seed).sample(pairs, count)
    return [(PROMPT_FORMAT.format(question=question), answer) for question, answer in chosen]


MAX_PAIRS = len(_all_pairs())
