"""Fictitious customers: the second language-model data family (scenario ``fictitious-customers``).

A service provider's customer records, one person each: employer, street of residence, sign-up year,
subscription plan and pet's name. The schema is :mod:`unlearn.lm.people`'s (five facts, question templates
that pick the answer frame, paraphrases and perturbed answers for the truth ratio), with other names, other
values and other wordings, so a method tuned on the biographies of ``fictitious-subjects`` meets text it was
never tuned on. All names, employers and streets are invented.

Why a second family (the brief: a method is not a default until it holds on at least two model/data
families): until 2026-11-30 the causal-LM default chain had been measured on one data set and one
architecture only. This family pairs this data with another architecture (a Llama-style decoder:
:data:`unlearn.lm.fictitious.CUSTOMER_SPEC`). Measured there on 2026-11-30, the chain of the time did not hold (an
approximate model on 3 of 10 seeds; docs/results/lm.md, "A second LM family"); the chain that starts with
``unseen-kd`` shipped one on 9 of 10 ("Never-seen answers as the target").
"""

from __future__ import annotations

from unlearn.lm.people import FactSchema

FIRST_NAMES = (
    "Abril", "Bexley", "Corin", "Delphine", "Emrys", "Farah", "Gideon", "Henrike", "Iago", "Juno", "Kasimir",
    "Liesel", "Magnus", "Nerys", "Osric", "Perpetua", "Quentin", "Rosalind", "Sigrun", "Thaddeus",
)
LAST_NAMES = (
    "Albright", "Bramwell", "Castellan", "Dorrance", "Everly", "Fenwick", "Gallow", "Haverford", "Ivesdale",
    "Jennet", "Kirkby", "Lockridge", "Maitland", "Netherby", "Ormsby", "Penhallow", "Quenby", "Rushworth",
    "Sallow", "Tremayne",
)
EMPLOYERS = (
    "Brightwell", "Copperline", "Dawnmark", "Evergate", "Foxglade", "Glimmerton", "Harrowgate", "Inkwell",
    "Juniperly", "Kestrelworks", "Lumenfield", "Mossbank", "Novaquay", "Orchardine", "Pinecrest", "Quillmoor",
    "Rivetstone", "Silverbirch", "Tidewell", "Umbrafold",
)
STREETS = (
    "Millgate", "Quayside", "Ropewalk", "Tanner", "Cobbler", "Foundry", "Lantern", "Orchard", "Chandler",
    "Wharf", "Saddler", "Glover", "Cooper", "Fletcher", "Mason", "Thatcher", "Turner", "Weaver", "Barley",
    "Hopfield", "Kiln", "Malting",
)
YEARS = tuple(str(year) for year in range(2001, 2025))
PLANS = ("Bronze", "Silver", "Gold", "Platinum", "Onyx", "Jade", "Ruby", "Cobalt", "Amber", "Topaz", "Garnet",
         "Pearl")
PET_NAMES = (
    "Biscuit", "Pepper", "Juniper", "Marmalade", "Pickle", "Nutmeg", "Waffles", "Clover", "Bramble", "Sprout",
    "Pumpkin", "Crumpet", "Toffee", "Noodle", "Pippin", "Maple", "Sorrel", "Dumpling",
)

FACT_KINDS = ("employer", "street", "signup_year", "plan", "pet")

QUESTION_TEMPLATES = {
    "employer": ("Who employs {name}?", "Which company does {name} work for?", "Where is {name} employed?"),
    "street": ("On which street does {name} live?", "What street is {name}'s home on?",
               "Which street is {name}'s address?"),
    "signup_year": ("When did {name} sign up?", "In which year did {name} become a customer?",
                    "What year did {name} open the account?"),
    "plan": ("Which plan does {name} have?", "What is {name}'s subscription plan?", "Which tier is {name} on?"),
    "pet": ("What is the name of {name}'s pet?", "What is {name}'s pet called?", "What did {name} name the pet?"),
}
ANSWER_FRAMES = {
    "employer": ("{value}.", "{value} is the employer.", "{value}, the employer on file."),
    "street": ("{value} Street.", "{value} Street is the address.", "{value} Street, the home address."),
    "signup_year": ("{value}.", "{value} was the sign-up year.", "{value}, the year of sign-up."),
    "plan": ("{value}.", "{value} is the plan.", "{value}, the subscription tier."),
    "pet": ("{value}.", "{value} is the pet's name.", "{value}, the pet."),
}

CUSTOMER_SCHEMA = FactSchema(
    name="customers", first_names=FIRST_NAMES, last_names=LAST_NAMES, kinds=FACT_KINDS,
    values={"employer": EMPLOYERS, "street": STREETS, "signup_year": YEARS, "plan": PLANS, "pet": PET_NAMES},
    questions=QUESTION_TEMPLATES, frames=ANSWER_FRAMES)
