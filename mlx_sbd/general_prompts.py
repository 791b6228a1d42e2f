"""General chat prompts, built in: everyday questions on topics far from the standard library.

The drafter learns the text it is trained on. Trained only on answers about the standard library, it drafts well
there and poorly on a story or a recipe (BENCHMARKS.md §9: its drafts pass 17-19% of the time on the general
prompts of scripts/bench_decode.py). These prompts give `--data self` general chat to answer, and the held-out
measurement (mlx_sbd.heldout, kind "general") prompts no training set saw: the topics are split train / valid /
test by a seeded shuffle, as stdlib_text splits modules, and every question about a topic stays in its split.

None of scripts/bench_decode.py's four prompts (a robot learning to paint, hash tables, working from home, Paris)
is a topic here, so that benchmark stays held out too.
"""

import random
from typing import Dict, List

TOPICS = [
    # everyday life
    "making bread at home", "brewing a good cup of coffee", "keeping houseplants alive", "planning a vegetable garden",
    "composting kitchen scraps", "cleaning a cast iron pan", "saving money on groceries", "meal planning for a week",
    "decluttering a closet", "moving to a new city", "training a puppy", "caring for an older cat",
    "choosing a first bicycle", "learning to swim as an adult", "running a first marathon", "stretching after exercise",
    "getting better sleep", "drinking enough water", "cooking rice perfectly", "making a simple tomato sauce",
    "packing for a long flight", "camping in the rain", "hiking safely in the mountains", "writing a thank-you note",
    "hosting a dinner party", "planning a birthday surprise", "budgeting for a vacation", "renting a first apartment",
    # science and nature
    "how rainbows form", "why the sky is blue", "how vaccines train the immune system", "the water cycle",
    "photosynthesis", "plate tectonics", "black holes", "the phases of the moon", "how bees make honey",
    "the migration of birds", "coral reefs", "volcanoes", "how batteries store energy", "the speed of light",
    "the human heart", "how muscles grow", "the life cycle of a star", "tides and the moon", "earthquakes",
    "how airplanes stay in the air", "the greenhouse effect", "DNA and genes", "how the eye sees color",
    # history and society
    "the invention of the printing press", "the ancient Roman roads", "the history of the bicycle",
    "the first moon landing", "the Silk Road", "the building of the pyramids", "the history of chess",
    "how libraries began", "the invention of the telephone", "the Olympic Games", "the history of money",
    # work, learning and writing
    "preparing for a job interview", "writing a cover letter", "giving a good presentation", "learning a new language",
    "taking useful notes in class", "studying for an exam", "asking for a raise", "running an effective meeting",
    "giving constructive feedback", "starting a small business", "writing a clear email", "reading more books",
    "learning to play the guitar", "drawing with charcoal", "taking better photos with a phone", "writing a haiku",
    # technology and computing (not the standard library)
    "how the internet routes a message", "what a computer's memory does", "how passwords are kept safe",
    "the difference between a CPU and a GPU", "how search engines rank pages", "backing up family photos",
    "recursion in programming", "binary numbers", "how a compiler works", "version control with git",
    "sorting algorithms", "how spreadsheets help with budgets", "choosing a laptop for school",
    # health and mind
    "managing stress before a deadline", "building a morning routine", "starting a meditation habit",
    "eating more vegetables", "walking every day", "staying in touch with old friends", "being a good listener",
    # money and civic life
    "compound interest", "paying off a credit card", "how taxes fund public services", "why people vote",
    "how a bill becomes a law", "recycling plastic", "saving energy at home", "buying a used car",
    # stories and imagination
    "a dragon who is afraid of heights", "a lighthouse keeper's last night", "a lost dog finding its way home",
    "a child who discovers a secret door", "a talking tree in a city park", "a detective who solves crimes with smell",
    "an astronaut who misses the ocean", "a baker who bakes bread that grants wishes", "a snowman in summer",
]

FORMS = [
    "What should I know about {t}?",
    "Explain {t} in simple terms.",
    "Give me three practical tips about {t}.",
    "Write a short paragraph about {t}.",
    "What are common mistakes or misconceptions about {t}?",
    "Why does {t} matter? Answer briefly.",
    "How would you explain {t} to a ten-year-old?",
    "Write a short story about {t}.",
    "Write a short poem about {t}.",
    "Summarize the most important facts about {t} in a few sentences.",
]

SPLIT_SHARES = {"train": 0.8, "valid": 0.1}  # the rest: test (held out of every training set)


def split_topics(seed: int = 0) -> Dict[str, List[str]]:
    """{"train", "valid", "test": [topic]}, a seeded split of TOPICS (at least one topic in each)."""
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    n_train = int(len(topics) * SPLIT_SHARES["train"])
    n_valid = max(1, int(len(topics) * SPLIT_SHARES["valid"]))
    return {"train": topics[:n_train], "valid": topics[n_train : n_train + n_valid],
            "test": topics[n_train + n_valid :]}


def general_prompts(split: str, seed: int = 0) -> List[str]:
    """Every question (FORMS x the split's topics), in a seeded order that spreads the topics."""
    prompts = [form.format(t=t) for t in split_topics(seed)[split] for form in FORMS]
    random.Random(seed).shuffle(prompts)
    return prompts
