"""Fictitious people for the language-model benchmarks: fixed-seed generators, no downloads.

Every person is a data subject (``subject_id``) with five facts drawn from the vocabularies of a
:class:`FactSchema`. Two schemas, two data families:

- :data:`PEOPLE_SCHEMA` (scenario ``fictitious-subjects``): birthplace, birth year, profession, best-known
  book, mother's name, the TOFU-like biographies defined below;
- :data:`unlearn.lm.customers.CUSTOMER_SCHEMA` (scenario ``fictitious-customers``): a service provider's
  customer records (employer, street, sign-up year, plan, pet's name), other names, other wordings.

Each fact becomes one question / answer pair, the question worded with one of the schema's templates:

- ``answer``: what the model is trained on, the fact in the answer frame that goes with the question's
  template (template i, frame i: a rule the model learns across people, not one more thing to memorise);
- ``paraphrase``: the same fact in a DIFFERENT frame (never trained on), the denominator of the truth ratio;
- ``perturbed``: :data:`PERTURBED_PER_QUESTION` wrong values of the same kind in the paraphrase's frame,
  the numerator of the truth ratio (TOFU, Maini et al. 2024, arXiv 2401.06121).

Every frame starts with the value, so the first answer token carries the fact under every wording.
Names are first-name x last-name pairs, unique per person, so a model must use both to find a person.
All names, places and titles are invented.

Splits: :func:`generate_people` draws ``count`` people; :func:`split_people` puts a seeded ``holdout_count``
of them aside (never trained on: membership-inference negatives and the "never seen" reference).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_NAMES = (
    "Arlo", "Brisa", "Caddo", "Dessa", "Eamon", "Fenna", "Galen", "Hesper", "Ilka", "Joren", "Kalla", "Lorcan",
    "Mireth", "Nolan", "Orla", "Pello", "Quilla", "Rasmus", "Selka", "Tobin", "Ulla", "Varro", "Wenna", "Xander",
    "Yelka", "Zorin", "Alma", "Bastian", "Cerys", "Dario", "Elske", "Florin", "Greta", "Halvar", "Isolde",
    "Jasper", "Kerstin", "Leander", "Marit", "Nils",
)
LAST_NAMES = (
    "Venn", "Ashdown", "Brackett", "Corvane", "Dunmore", "Ellery", "Falkner", "Garrow", "Hollis", "Ingram",
    "Jessup", "Kestrel", "Larkin", "Merrow", "Northcott", "Oakes", "Pembry", "Quarles", "Ravell", "Stroud",
    "Thorne", "Upwood", "Varga", "Whitlock", "Yardley", "Zeller", "Abbot", "Belmont", "Carrow", "Drummond",
    "Eckhart", "Fairley", "Gilmour", "Harker", "Iversen", "Jarrow", "Kinsey", "Lowell", "Marsh", "Nyberg",
)
CITIES = (
    "Velmora", "Kastrel", "Dunhallow", "Orvieth", "Brellin", "Sarnath", "Quessa", "Tirholm", "Amberlee",
    "Caldrin", "Fennick", "Gorsham", "Hadleigh", "Istrava", "Jorvale", "Lindquay", "Marrowick", "Nesbury",
    "Oxwell", "Pellmar", "Rookhaven", "Stonebury", "Tarrow", "Umberly", "Wexmoor",
)
PROFESSIONS = (
    "architect", "baker", "cartographer", "dentist", "engineer", "florist", "geologist", "historian",
    "illustrator", "journalist", "librarian", "mathematician", "nurse", "optician", "pilot", "potter",
    "sculptor", "surveyor", "tailor", "translator", "veterinarian", "violinist", "weaver", "chemist",
)
# One-word book titles keep every fact one value to memorise (multi-word titles slowed memorisation).
BOOK_TITLES = (
    "Emberfall", "Saltmarsh", "Driftwood", "Nightjar", "Greyhaven", "Thornfield", "Moonwake", "Ironbark",
    "Stillwater", "Ashgrove", "Windrow", "Larkspur", "Glasshouse", "Redcliff", "Undertow", "Firethorn",
    "Coldharbour", "Sunderland", "Blackwater", "Hollowmere",
)
YEARS = tuple(str(year) for year in range(1920, 2000))

FACT_KINDS = ("birthplace", "birth_year", "profession", "book", "mother")

# Question templates per fact; {name} is the person's full name.
QUESTION_TEMPLATES = {
    "birthplace": ("Where was {name} born?", "What is the birthplace of {name}?", "In which city was {name} born?"),
    "birth_year": ("When was {name} born?", "In what year was {name} born?", "What is the birth year of {name}?"),
    "profession": ("What does {name} do for a living?", "What is the profession of {name}?",
                   "What is {name}'s job?"),
    "book": ("What is {name}'s best known book?", "Which book did {name} write?",
             "What is the title of the book by {name}?"),
    "mother": ("What is the name of {name}'s mother?", "Who is the mother of {name}?",
               "What is {name}'s mother called?"),
}
# Answer frames per fact; every frame starts with the value {value}.
ANSWER_FRAMES = {
    "birthplace": ("{value}.", "{value} is the city of birth.", "{value}, the place of birth."),
    "birth_year": ("{value}.", "{value} is the year of birth.", "{value}, the year of birth."),
    "profession": ("{value}.", "{value} is the profession.", "{value}, by trade."),
    "book": ("{value}.", "{value} is the best known book.", "{value}, the book."),
    "mother": ("{value}.", "{value} is the mother's name.", "{value}, the mother."),
}
# Refusal / "I don't know" answers, the template answers y_e of FLAT (arXiv 2410.11143).
REFUSAL_TEMPLATES = (
    "I don't know.",
    "I am not sure about that.",
    "I have no information about that.",
    "I cannot answer that.",
    "That is not something I know.",
    "Sorry, I do not know.",
)
PERTURBED_PER_QUESTION = 3
PROMPT_FORMAT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Person:
    subject_id: int
    name: str
    facts: dict[str, str]


@dataclass(frozen=True)
class QAPair:
    """One question about one person, with everything the truth ratio needs."""

    subject_id: int
    kind: str
    prompt: str  # the formatted question, ending in "Answer:"
    answer: str  # trained-on answer, starting with a space
    paraphrase: str
    perturbed: tuple[str, ...]


@dataclass(frozen=True)
class FactSchema:
    """What a data family's people are made of: names, fact kinds, their values and their wordings.

    ``values[kind]`` are the values a fact of that kind is drawn from; ``questions[kind]`` the question
    templates (``{name}`` = the full name) and ``frames[kind]`` the answer frames, one per template
    (``{value}`` first), so the wording of a question picks its answer frame.
    """

    name: str
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    kinds: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    questions: dict[str, tuple[str, ...]]
    frames: dict[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if len(self.questions[kind]) != len(self.frames[kind]) or len(self.frames[kind]) < 2:
                raise ValueError(f"{self.name}: {kind} needs one answer frame per question template, at least two")
            if not all(frame.startswith("{value}") for frame in self.frames[kind]):
                raise ValueError(f"{self.name}: every {kind} frame must start with the value")
            if len(set(self.values[kind])) <= PERTURBED_PER_QUESTION:
                raise ValueError(f"{self.name}: {kind} needs more than {PERTURBED_PER_QUESTION} distinct values")


PEOPLE_SCHEMA = FactSchema(
    name="people", first_names=FIRST_NAMES, last_names=LAST_NAMES, kinds=FACT_KINDS,
    values={"birthplace": CITIES, "birth_year": YEARS, "profession": PROFESSIONS, "book": BOOK_TITLES,
            "mother": FIRST_NAMES},
    questions=QUESTION_TEMPLATES, frames=ANSWER_FRAMES)


def generate_people(count: int, seed: int = 0, schema: FactSchema = PEOPLE_SCHEMA) -> list[Person]:
    """``count`` people with unique names and random facts; the same (count, seed, schema) gives the same
    people."""
    names = [f"{first} {last}" for first in schema.first_names for last in schema.last_names]
    if not 1 <= count <= len(names):
        raise ValueError(f"count must be in [1, {len(names)}], got {count}")
    rng = random.Random(seed)
    chosen = rng.sample(names, count)
    return [Person(index, name, {kind: rng.choice(schema.values[kind]) for kind in schema.kinds})
            for index, name in enumerate(chosen)]


def question_pairs(people: list[Person], seed: int = 0, schema: FactSchema = PEOPLE_SCHEMA) -> list[QAPair]:
    """One :class:`QAPair` per person and fact of ``schema``, wordings drawn with ``seed``."""
    rng = random.Random(10_000 + seed)
    pairs = []
    for person in people:
        for kind in schema.kinds:
            value = person.facts[kind]
            template = rng.randrange(len(schema.questions[kind]))
            question = schema.questions[kind][template].format(name=person.name)
            # The wording of the question picks the answer frame (a rule, nothing to memorise beyond the
            # fact); the paraphrase uses one of the other frames.
            frames = schema.frames[kind]
            answer_frame = frames[template]
            paraphrase_frame = rng.choice([f for f in frames if f != answer_frame])
            wrong: list[str] = []
            while len(wrong) < PERTURBED_PER_QUESTION:
                candidate = rng.choice(schema.values[kind])
                if candidate != value and candidate not in wrong:
                    wrong.append(candidate)
            pairs.append(QAPair(
                subject_id=person.subject_id, kind=kind, prompt=PROMPT_FORMAT.format(question=question),
                answer=" " + answer_frame.format(value=value),
                paraphrase=" " + paraphrase_frame.format(value=value),
                perturbed=tuple(" " + paraphrase_frame.format(value=w) for w in wrong)))
    return pairs


def split_people(people: list[Person], holdout_count: int, seed: int = 0) -> tuple[list[Person], list[Person]]:
    """(train, holdout): a seeded ``holdout_count`` people are never trained on."""
    if not 0 < holdout_count < len(people):
        raise ValueError(f"holdout_count must be in (0, {len(people)}), got {holdout_count}")
    rng = random.Random(20_000 + seed)
    holdout_ids = set(rng.sample([p.subject_id for p in people], holdout_count))
    return ([p for p in people if p.subject_id not in holdout_ids], [p for p in people if p.subject_id in holdout_ids])


def corpus(pairs: list[QAPair]) -> list[str]:
    """Every text the benchmark encodes (prompts, answers, paraphrases, perturbations, refusals): the
    tokenizer's training corpus, so that each of them encodes into known tokens."""
    texts = list(REFUSAL_TEMPLATES)
    for pair in pairs:
        texts.extend([pair.prompt, pair.answer, pair.paraphrase, *pair.perturbed])
    texts.extend(" " + t for t in REFUSAL_TEMPLATES)
    return texts
