"""Writes corpus.txt, the small built-in fine-tuning data set: short sentences from a little grammar with
regularities a tiny model can learn in a few dozen steps (agreement, fixed pairings, simple arithmetic).
Deterministic: running it again gives the same file."""
import random

rng = random.Random(2026)
animals = [("cat", "cats"), ("dog", "dogs"), ("fox", "foxes"), ("owl", "owls"), ("bee", "bees"), ("yak", "yaks")]
colors = ["red", "blue", "green", "amber", "grey", "white"]
places = ["river", "forest", "garden", "valley", "harbour", "meadow"]
habits = {"cat": "sleeps", "dog": "barks", "fox": "hunts", "owl": "watches", "bee": "hums", "yak": "grazes"}
foods = {"cat": "fish", "dog": "bones", "fox": "berries", "owl": "mice", "bee": "nectar", "yak": "grass"}

lines = []
for _ in range(1800):
    (one, many), color, place = rng.choice(animals), rng.choice(colors), rng.choice(places)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    kind = rng.randrange(4)
    if kind == 0:
        lines.append(f"The {color} {one} {habits[one]} by the {place}.")
    elif kind == 1:
        lines.append(f"{a} {many} and {b} {many} make {a + b} {many}.")
    elif kind == 2:
        lines.append(f"Every {one} in the {place} eats {foods[one]}.")
    else:
        lines.append(f"Near the {place}, {a} {color} {many} eat {foods[one]}.")

with open(__file__.replace("make_corpus.py", "corpus.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
