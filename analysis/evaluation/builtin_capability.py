"""A tiny project-written capability set for tests and the quickstart (no public dataset text).

`builtin_mc`: 20 general-knowledge multiple-choice questions (4 options each).
`builtin_arith`: 10 short arithmetic word problems with integer answers.
Far too small for conclusions on their own (a 95% CI on 20 items is about +-0.2 wide); real runs use
MMLU / TruthfulQA / GSM8K from local files (`analysis.evaluation.capability_data`).
"""
from __future__ import annotations

from analysis.evaluation.capability_data import GenItem, MCItem

# (question, options, index of the correct option)
_MC: tuple[tuple[str, tuple[str, str, str, str], int], ...] = (
    ("Which planet is closest to the Sun?", ("Venus", "Mercury", "Mars", "Jupiter"), 1),
    ("How many legs does a spider have?", ("Six", "Ten", "Eight", "Four"), 2),
    ("What is the boiling point of water at sea level in degrees Celsius?", ("100", "90", "120", "80"), 0),
    ("Which gas do plants take in from the air to make sugar?", ("Oxygen", "Nitrogen", "Helium", "Carbon dioxide"), 3),
    ("What is the largest ocean on Earth?", ("Atlantic Ocean", "Indian Ocean", "Pacific Ocean", "Arctic Ocean"), 2),
    ("How many days are there in a leap year?", ("365", "366", "364", "360"), 1),
    ("Which organ pumps blood around the human body?", ("The heart", "The liver", "The lungs", "The kidneys"), 0),
    ("What is the chemical symbol for gold?", ("Ag", "Go", "Gd", "Au"), 3),
    ("Which shape has exactly three sides?", ("A square", "A triangle", "A pentagon", "A circle"), 1),
    ("What do bees collect from flowers to make honey?", ("Nectar", "Sand", "Leaves", "Bark"), 0),
    ("Which is the smallest prime number?", ("One", "Three", "Two", "Five"), 2),
    ("In which season do many trees lose their leaves in temperate regions?", ("Spring", "Summer", "Winter", "Autumn"), 3),
    ("What is frozen water called?", ("Steam", "Ice", "Fog", "Dew"), 1),
    ("How many minutes are there in one hour?", ("Sixty", "Forty", "Hundred", "Thirty"), 0),
    ("Which instrument is used to measure temperature?", ("A barometer", "A ruler", "A thermometer", "A compass"), 2),
    ("What is the opposite of the word 'ancient'?", ("Old", "Historic", "Antique", "Modern"), 3),
    ("Which animal is known for carrying its house on its back?", ("A snail", "A rabbit", "A horse", "A sparrow"), 0),
    ("What colour do you get by mixing blue and yellow paint?", ("Purple", "Green", "Orange", "Red"), 1),
    ("Which unit is used to measure electrical resistance?", ("Volt", "Watt", "Ohm", "Ampere"), 2),
    ("What force pulls objects toward the centre of the Earth?", ("Magnetism", "Friction", "Buoyancy", "Gravity"), 3),
)

# (question, integer answer)
_ARITH: tuple[tuple[str, int], ...] = (
    ("A baker makes 12 rolls in each batch and bakes 4 batches. How many rolls does she make?", 48),
    ("Tom has 35 marbles and gives 9 to his sister. How many marbles does Tom have left?", 26),
    ("A bus carries 40 people. At the first stop 13 get off and 5 get on. How many people are on the bus?", 32),
    ("Pencils cost 3 dollars each. How many dollars do 7 pencils cost?", 21),
    ("A garden has 6 rows of tulips with 8 tulips in each row. How many tulips are there?", 48),
    ("Maria reads 15 pages a day. How many pages does she read in 6 days?", 90),
    ("A box holds 24 eggs. If 72 eggs are packed, how many boxes are filled?", 3),
    ("Sam saved 50 dollars and spent 18 dollars on a book and 12 dollars on lunch. How many dollars are left?", 20),
    ("A train travels 60 kilometres each hour. How far does it travel in 5 hours, in kilometres?", 300),
    ("There are 9 apples in a bowl. Lena adds twice as many. How many apples are in the bowl now?", 27),
)


def builtin_mc_items() -> list[MCItem]:
    """The 20 project-written multiple-choice items."""
    return [MCItem(f"builtin_mc/{i}", q, options, answer) for i, (q, options, answer) in enumerate(_MC)]


def builtin_arith_items() -> list[GenItem]:
    """The 10 project-written arithmetic word problems."""
    return [GenItem(f"builtin_arith/{i}", q, str(answer)) for i, (q, answer) in enumerate(_ARITH)]


def builtin_capability_tasks() -> dict[str, list[MCItem] | list[GenItem]]:
    """Both builtin tasks, keyed by task name (input for `analysis.evaluation.capability.evaluate_capability`)."""
    return {"builtin_mc": builtin_mc_items(), "builtin_arith": builtin_arith_items()}
