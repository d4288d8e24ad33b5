"""An LM hidden case of your own: fictitious staff of a firm, on the benchmark's GPT-2-sized model and recipe.

``.venv/bin/python -m unlearn.bench --family examples.lm_family.staff:family --scenario staff-subject
--method auto --seed 0 --json`` (from the repository root). The benchmark draws 200 people from the names
below (20 x 10), trains a model on 100 of them, deals the 100 others into ``tune`` and ``audit`` by keyed hash,
erases 10 trained people, and scores the result as on ``fictitious-subjects`` (forget quality, utility, MIA AUC,
the speed-up against a retrain in the same process, the gate). Change the names, facts, wordings, model shape
or recipe to make another case; each fact kind needs at least four values, two or more question templates and
one answer frame per template that starts with the value.
"""

from unlearn.lm.fictitious import LM_RECIPE, LMFamily
from unlearn.lm.model import GPTSpec
from unlearn.lm.people import FactSchema

FIRST_NAMES = ("Aldous", "Brenna", "Cosmo", "Delphine", "Ezra", "Fenella", "Gideon", "Hester", "Isidore", "Juno",
               "Kester", "Lavinia", "Mordecai", "Nerys", "Octavian", "Perpetua", "Quillon", "Rosamund", "Seton",
               "Thisbe")
LAST_NAMES = ("Ashdown", "Blackmore", "Crewe", "Dunmore", "Everleigh", "Fairweather", "Goodall", "Hollins",
              "Inchcape", "Jessop")

STAFF_SCHEMA = FactSchema(
    name="staff", first_names=FIRST_NAMES, last_names=LAST_NAMES,
    kinds=("department", "office", "start_year", "badge"),
    values={
        "department": ("Accounts", "Logistics", "Research", "Legal", "Procurement", "Facilities", "Design",
                       "Payroll"),
        "office": ("Aberdeen", "Bruges", "Cordoba", "Dresden", "Eindhoven", "Florence", "Geneva", "Halifax",
                   "Innsbruck", "Jaipur"),
        "start_year": tuple(str(year) for year in range(1996, 2024)),
        "badge": ("heron", "lynx", "otter", "falcon", "badger", "marten", "kestrel", "stoat", "plover"),
    },
    questions={
        "department": ("Which department is {name} in?", "Where in the firm does {name} work?"),
        "office": ("Which office is {name} based in?", "In which city does {name} work?"),
        "start_year": ("When did {name} join the firm?", "In which year did {name} start?"),
        "badge": ("Which animal is on {name}'s badge?", "What is {name}'s badge emblem?"),
    },
    frames={
        "department": ("{value}.", "{value}, the department."),
        "office": ("{value}.", "{value}, the office."),
        "start_year": ("{value}.", "{value}, the year of joining."),
        "badge": ("{value}.", "{value}, the emblem."),
    })


def family() -> LMFamily:
    """The schema, the model's shape (a GPT-NeoX of the benchmark's size; ``gpt2`` and ``llama`` also exist) and
    the recipe that trains the original and its retrain."""
    return LMFamily(STAFF_SCHEMA, GPTSpec(layers=2, width=128, heads=4, context=64, architecture="neox"), LM_RECIPE)
