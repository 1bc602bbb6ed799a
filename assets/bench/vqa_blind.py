"""What a model that never looks scores on the demo world's short questions: for each question form (the question
with its colour word masked), the commonest answer in the training split, scored by exact match on the test split,
as eval.py's vqa task scores a model.

    python assets/bench/vqa_blind.py [data/demo]
"""
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import prepare_data  # noqa: E402
from eval import vqa_score  # noqa: E402

COLOURS = r"\b(" + "|".join(prepare_data.SHAPE_COLOURS) + r")\b"  # the shapes' colours, which questions name


def short_answers(path):
    """[(question, answer)] of every short_answer annotation of a split's records."""
    pairs = []
    with open(path) as f:
        for line in f:
            for annotation in json.loads(line)["annotations"]:
                if annotation["style"] == "short_answer":
                    messages = annotation["messages"]
                    pairs.append((messages[0]["content"], messages[-1]["content"]))
    return pairs


def form(question):
    return re.sub(COLOURS, "C", question)


if __name__ == "__main__":
    data_dir = sys.argv[1] if len(sys.argv) > 1 else "data/demo"
    answers = collections.defaultdict(collections.Counter)
    for question, answer in short_answers(f"{data_dir}/synth_image/train.jsonl"):
        answers[form(question)][answer] += 1
    test = short_answers(f"{data_dir}/synth_image/test.jsonl")
    guess = {f: counts.most_common(1)[0][0] for f, counts in answers.items()}
    hits = sum(vqa_score(guess.get(form(q), ""), a)["exact_match"] for q, a in test)
    print(f"{len(test)} test questions, the commonest training answer of each question form: {hits / len(test):.3f}")
    for f, n in collections.Counter(form(q) for q, _ in test).most_common():
        print(f"  {n:4d}  {f}  -> {guess.get(f)!r}")
