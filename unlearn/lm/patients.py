"""Fictitious patients: the third language-model data family (scenario ``fictitious-patients``), held out.

A clinic's patient records, one person each: the clinic they are registered at, their doctor, an allergy,
their blood type and the month of their last visit. The schema is :mod:`unlearn.lm.people`'s (five facts,
question templates that pick the answer frame, paraphrases and perturbed answers for the truth ratio), with
other names, other values and other wordings. All names, clinics and doctors are invented.

Why a third family: every default of the causal-LM chain was chosen on the first two (``unseen-kd``'s weights
on seeds 0-1 of both, biographies and customers), so neither of them is data the chain was never tuned on.
This one pairs new data with a third architecture (GPT-NeoX: parallel attention and MLP, partial rotary
positions, untied output layer; :data:`unlearn.lm.fictitious.PATIENT_SPEC`) and the same recipe, all fixed
before any run of the family. Nothing is tuned on it: it is what an outside reviewer's hidden case looks like
(docs/results/lm.md, "A held-out LM family").
"""

from __future__ import annotations

from unlearn.lm.people import FactSchema

FIRST_NAMES = (
    "Aurelie", "Benedikt", "Cosima", "Dorian", "Elspeth", "Florian", "Ginevra", "Hamish", "Imelda", "Joscelin",
    "Katrin", "Lucan", "Marisol", "Niall", "Ottilie", "Pascoe", "Rhiannon", "Severin", "Tamsin", "Ulric",
)
LAST_NAMES = (
    "Ashcombe", "Blackwood", "Cranleigh", "Delacourt", "Eastleigh", "Fairbairn", "Greaves", "Holloway", "Inchcape",
    "Jessop", "Kilbride", "Larkworth", "Merriman", "Newbold", "Oakhurst", "Pemberton", "Radcliffe", "Stainforth",
    "Thornbury", "Wolverton",
)
CLINICS = (
    "Alderbrook", "Beechmoor", "Cedarvale", "Dunmere", "Elmstead", "Fernhollow", "Greystone", "Hazelmere",
    "Ivybridge", "Larchfield", "Marshgate", "Nettlecombe", "Oakvale", "Poplarwick", "Rowanlea", "Sedgefield",
    "Thistlewood", "Willowmere",
)
DOCTORS = (
    "Abernethy", "Brackenbury", "Carmichael", "Drummond", "Ellingham", "Fotheringay", "Galbraith", "Hartigan",
    "Ironside", "Kavanagh", "Lennox", "Montague", "Nightingale", "Ormerod", "Prendergast", "Quayle", "Rutherford",
    "Sinclair", "Trevelyan", "Vandermeer",
)
ALLERGIES = (
    "penicillin", "peanuts", "shellfish", "latex", "pollen", "aspirin", "sesame", "dust mites", "wasp stings",
    "lactose", "ibuprofen", "soy", "mould", "cat dander", "codeine", "eggs",
)
BLOOD_TYPES = ("O positive", "O negative", "A positive", "A negative", "B positive", "B negative", "AB positive",
               "AB negative")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

FACT_KINDS = ("clinic", "doctor", "allergy", "blood_type", "visit_month")

QUESTION_TEMPLATES = {
    "clinic": ("Which clinic is {name} registered at?", "Where is {name} a patient?",
               "What is the name of {name}'s clinic?"),
    "doctor": ("Who is {name}'s doctor?", "Which doctor treats {name}?", "Who is the physician of {name}?"),
    "allergy": ("What is {name} allergic to?", "Which allergy does {name} have?",
                "What allergy is on {name}'s chart?"),
    "blood_type": ("What is {name}'s blood type?", "Which blood group does {name} have?",
                   "What blood type is on {name}'s record?"),
    "visit_month": ("When did {name} last visit the clinic?", "In which month was {name}'s last visit?",
                    "What month did {name} last see the doctor?"),
}
ANSWER_FRAMES = {
    "clinic": ("{value} Clinic.", "{value} Clinic is where they are registered.", "{value} Clinic, on the record."),
    "doctor": ("{value}.", "{value} is the doctor.", "{value}, the physician on file."),
    "allergy": ("{value}.", "{value} is the allergy.", "{value}, as noted on the chart."),
    "blood_type": ("{value}.", "{value} is the blood type.", "{value}, the recorded blood group."),
    "visit_month": ("{value}.", "{value} was the last visit.", "{value}, the month of the last visit."),
}

PATIENT_SCHEMA = FactSchema(
    name="patients", first_names=FIRST_NAMES, last_names=LAST_NAMES, kinds=FACT_KINDS,
    values={"clinic": CLINICS, "doctor": DOCTORS, "allergy": ALLERGIES, "blood_type": BLOOD_TYPES,
            "visit_month": MONTHS},
    questions=QUESTION_TEMPLATES, frames=ANSWER_FRAMES)
