"""A tiny project-written capability set for tests and the quickstart (no public dataset text).

`builtin_mc`: 20 general-knowledge multiple-choice questions (4 options each).
`builtin_arith`: 10 short arithmetic word problems with integer answers.
`builtin_benign_pairs`: 12 benign requests with a short written answer each (about 400 response
tokens in all), the text the next-token loss and KL under steering are measured on in tests and
the quickstart (`analysis.evaluation.benign_text`).
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


# (request, answer): ordinary requests and plain answers, written for this project
_BENIGN: tuple[tuple[str, str], ...] = (
    ("How do I boil an egg so the yolk stays soft?",
     "Bring a pot of water to a gentle boil, lower the egg in with a spoon and cook it for six minutes. "
     "Then cool it in cold water for a minute before peeling."),
    ("Give me two tips for remembering new words in a foreign language.",
     "Say each new word out loud in a sentence of your own, and review it again after one day and after one week. "
     "Short, spaced reviews work better than one long session."),
    ("What is photosynthesis?",
     "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar. "
     "Oxygen is released as a by-product."),
    ("Write one friendly sentence inviting a colleague to lunch.",
     "Would you like to join me for lunch on Thursday at the little noodle place around the corner?"),
    ("Why do cats purr?",
     "Cats often purr when they are relaxed or content, for example while being stroked. "
     "They also purr when stressed or hurt, which may help them calm down."),
    ("Suggest a quick breakfast that needs no cooking.",
     "Try a bowl of yogurt with oats, sliced banana and a spoon of honey. It takes two minutes to make."),
    ("How many planets are in the solar system?",
     "There are eight planets: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
    ("Explain what a budget is in one or two sentences.",
     "A budget is a plan for how you will spend and save your money over a period such as a month. "
     "It helps you see where money goes and avoid spending more than you earn."),
    ("What should I pack for a day hike?",
     "Pack water, a snack, a light jacket, sunscreen, a map or charged phone, and a small first-aid kit."),
    ("Describe a rainbow to a child.",
     "A rainbow is a big, curved band of colours in the sky. It appears when sunlight shines through "
     "raindrops, which split the light into red, orange, yellow, green, blue and violet."),
    ("How can I make my houseplants grow better?",
     "Give them bright indirect light, water only when the top of the soil feels dry, and feed them with "
     "a mild fertiliser in spring and summer."),
    ("What is the capital of Canada?",
     "The capital of Canada is Ottawa, a city in the province of Ontario."),
)


def builtin_benign_pairs() -> list[tuple[str, str]]:
    """The 12 project-written (request, answer) pairs."""
    return list(_BENIGN)


def builtin_mc_items() -> list[MCItem]:
    """The 20 project-written multiple-choice items."""
    return [MCItem(f"builtin_mc/{i}", q, options, answer) for i, (q, options, answer) in enumerate(_MC)]


def builtin_arith_items() -> list[GenItem]:
    """The 10 project-written arithmetic word problems."""
    return [GenItem(f"builtin_arith/{i}", q, str(answer)) for i, (q, answer) in enumerate(_ARITH)]


def builtin_capability_tasks() -> dict[str, list[MCItem] | list[GenItem]]:
    """Both builtin tasks, keyed by task name (input for `analysis.evaluation.capability.evaluate_capability`)."""
    return {"builtin_mc": builtin_mc_items(), "builtin_arith": builtin_arith_items()}
