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

# Topics added after the split above was fixed (session 25, for the built-in adapter's draft corpus): training only,
# so the valid and test topics (the held-out kind "general"), and every measurement made on them, stay what they were.
# None is one of the split's topics or a near copy of a valid or test one.
MORE_TOPICS = [
    # home and everyday life
    "fixing a leaky faucet", "painless ways to fold laundry", "organizing a kitchen pantry", "choosing a good mattress",
    "baking chocolate chip cookies", "making pancakes from scratch", "growing herbs on a windowsill",
    "keeping a goldfish healthy", "teaching a child to ride a scooter", "planning a picnic", "packing school lunches",
    "choosing running shoes", "keeping a journal", "sewing on a button", "washing a wool sweater",
    "sharpening kitchen knives", "making soup from leftovers", "hanging a picture frame",
    "cleaning windows without streaks", "planning a road trip", "visiting a museum with kids",
    "caring for a pet rabbit", "feeding birds in winter",
    # science and nature
    "how clouds form", "why leaves change color in autumn", "how fish breathe underwater", "the life of a butterfly",
    "how snowflakes form", "the northern lights", "how magnets work", "why ice floats", "the solar system's planets",
    "how thunderstorms start", "the deep ocean", "desert animals", "rainforests", "how seeds sprout",
    "the human brain", "how sound travels", "comets and asteroids", "how wind turbines make electricity",
    "the food chain", "glaciers", "how owls hunt at night", "the moon's craters", "how the lungs work",
    # history and culture
    "the invention of the light bulb", "the history of the calendar", "ancient Egyptian writing",
    "the first trains", "the history of maps", "how castles were built", "the Wright brothers",
    "the history of tea", "medieval knights", "the history of the piano",
    "the Great Wall of China", "the first cars", "how postal services began",
    # work, learning and creativity
    "learning to cook for beginners", "keeping a clean desk", "planning a study schedule",
    "writing a good story opening", "making friends at a new school", "learning to type faster",
    "setting goals for the year", "working in a team", "writing a book review", "learning to knit",
    "sketching landscapes", "keeping a sketchbook", "memorizing a poem", "managing time in college",
    # technology (not the standard library)
    "how email travels", "what cloud storage is", "how GPS finds your location", "how touch screens work",
    "keeping a phone battery healthy", "what an operating system does", "how video games are made",
    "staying safe on social media", "how QR codes work", "what artificial intelligence is",
    # health and mind
    "staying calm during exams", "drinking less coffee", "keeping a gratitude list", "taking breaks from screens",
    "cooking healthy breakfasts", "getting back into exercise", "caring for your teeth", "spending time in nature",
    # stories and imagination
    "a village of clockmakers", "a cat who becomes the mayor of a small town", "a pirate who is afraid of water",
    "a girl who can talk to the wind", "a library that opens only at midnight", "a giant who loves gardening",
    "a mouse who wants to fly", "a train that travels to the stars", "an old map that leads to a forgotten island",
    "a penguin who moves to the desert",
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
    """{"train", "valid", "test": [topic]}, a seeded split of TOPICS (at least one topic in each); MORE_TOPICS join
    train."""
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    n_train = int(len(topics) * SPLIT_SHARES["train"])
    n_valid = max(1, int(len(topics) * SPLIT_SHARES["valid"]))
    return {"train": topics[:n_train] + MORE_TOPICS, "valid": topics[n_train : n_train + n_valid],
            "test": topics[n_train + n_valid :]}


def general_prompts(split: str, seed: int = 0) -> List[str]:
    """Every question (FORMS x the split's topics), in a seeded order that spreads the topics."""
    prompts = [form.format(t=t) for t in split_topics(seed)[split] for form in FORMS]
    random.Random(seed).shuffle(prompts)
    return prompts
