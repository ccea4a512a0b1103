"""The default prompt set for `bridge bench`: one prompt per kind of work, because
acceptance depends on the text. Creative writing is where drafts are known to be weak."""

BENCH_PROMPTS: tuple[tuple[str, str], ...] = (
    ("chat", "Hi! Can you recommend a good way to spend a rainy Sunday afternoon?"),
    ("chat", "What are some healthy breakfast ideas that take less than five minutes?"),
    ("code", "Write a Python function that checks whether a string is a palindrome, "
             "ignoring case and punctuation, with a docstring and two examples."),
    ("code", "Explain what this does and how to make it faster:\n"
             "def f(xs):\n    out = []\n    for x in xs:\n        if x not in out:\n"
             "            out.append(x)\n    return out"),
    ("math", "A train travels 180 km in 2 hours and then 120 km in 1.5 hours. "
             "What is its average speed over the whole trip? Show your steps."),
    ("math", "Solve for x: 3x + 7 = 25. Explain each step."),
    ("summarization", "Summarize in three sentences: The Industrial Revolution began in "
                      "Britain in the late 18th century. It moved production from hand "
                      "tools to machines, steam power and factories. Cities grew quickly as "
                      "people left farms for factory work, and living conditions were often "
                      "poor. Over the next century the changes spread to Europe and North "
                      "America and reshaped economies, transport and daily life."),
    ("creative", "Write a short story about a lighthouse keeper who finds a message "
                 "in a bottle."),
    ("creative", "Write a poem about the first snow of winter in a quiet town."),
)
