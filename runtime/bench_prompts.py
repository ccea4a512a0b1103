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

# Copy-heavy work, where much of the answer repeats the input: drafts looked up in the
# context pay here even on CPUs.
COPY_PROMPTS: tuple[tuple[str, str], ...] = (
    ("code edit", "Here is a Python function:\n\ndef average(values):\n    total = 0\n"
                  "    count = 0\n    for v in values:\n        total += v\n"
                  "        count += 1\n    if count == 0:\n        return 0.0\n"
                  "    return total / count\n\nRewrite the function with the variable "
                  "`total` renamed to `running_sum`."),
    ("code fix", "Fix the bug in this code and show the corrected code:\n\n```python\n"
                 "def is_even(n):\n    return n % 2 == 1\n\nfor i in range(10):\n"
                 "    if is_even(i):\n        print(i, 'is even')\n```"),
    ("spelling", "Correct the spelling in this text:\n\nThe comittee met on tuesday to "
                 "discus the new libary budjet. Most members agreed that the curent funding "
                 "is not enough to mantain the building."),
    ("to json", "Convert to JSON:\n\nname: Alice Martin\ncity: Paris\nage: 34\n"
                "email: alice.martin@example.com\nphone: +33 1 23 45 67 89"),
    ("to csv", "Turn this into a CSV table with a header row name,city,age:\n\n"
               "Alice Martin lives in Paris and is 34.\nBob Chen lives in Toronto and is 29."
               "\nCarla Diaz lives in Madrid and is 41."),
    ("extraction", "Copy every sentence of this notice that mentions a date, word for "
                   "word:\n\nThe pool closes for cleaning on 3 March. Swimming lessons "
                   "continue as usual. The sauna reopens on 10 March after repairs. "
                   "Members can renew their passes online. The summer timetable starts "
                   "on 1 June and runs until 31 August."),
    ("quoting", "Repeat the following text exactly, then add one sentence that summarizes "
                "it:\n\nThe quick brown fox jumps over the lazy dog. The dog does not "
                "move. The fox runs into the forest and the dog goes back to sleep."),
    ("reformat", "Rewrite this as a Markdown bullet list, one item per line, keeping the "
                 "words:\n\nmilk; eggs; two loaves of bread; a bag of apples; coffee beans; "
                 "olive oil; a jar of honey"),
)

PROMPT_SETS = {"open": BENCH_PROMPTS, "copy": COPY_PROMPTS}
