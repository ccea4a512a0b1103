"""The request workloads of ``bench.serve``, ``bench.concurrency`` and ``bench.rpc``.

``SESSIONS``: series of similar requests, as programs that call a local server send them
(issue 17). ``OPEN_REQUESTS``: open-ended chat requests, each different from the others and
from the sessions, on which drafting rarely pays: a drafting memory must not slow them.
"""

from runtime.bench_prompts import BENCH_PROMPTS

_CODE = """\
def load_prices(path):
    prices = {}
    with open(path) as f:
        for line in f:
            name, price = line.strip().split(",")
            prices[name] = float(price)
    return prices


def total(prices, items):
    result = 0
    for item in items:
        result += prices[item]
    return result
"""
_DOC = ("The Harbor Street library opens at 9:00 on weekdays and at 10:00 on Saturdays; it "
        "is closed on Sundays. Members may borrow up to 8 books for 21 days, and renew each "
        "loan twice online. Late returns cost 0.25 euros per book per day, capped at 5 euros. "
        "The reading room on the second floor has 40 desks, and laptops can be borrowed at "
        "the front desk for 3 hours with a library card. Printing costs 0.10 euros a page.")
SESSIONS: dict[str, list[str]] = {
    "records to JSON": [
        "Extract this record as JSON with the keys name, age, city and job. Reply with the "
        f"JSON only.\n\n{r}" for r in (
            "Maria Lopez, 34, works as a nurse in Seville.",
            "Tom Becker is a 51-year-old carpenter from Hamburg.",
            "Aiko Tanaka (29) is a software engineer living in Osaka.",
            "Lucas Moreau, aged 42, teaches history in Lyon.",
            "Priya Nair, a 37-year-old architect, lives in Pune.",
            "Jonas Berg, 23, is a barista in Uppsala.")],
    "code edits of one file": [
        f"Here is a Python file:\n\n{_CODE}\n{task} Reply with the whole file." for task in (
            "Rename the function total to order_total.",
            "Add a docstring to load_prices.",
            "Make total use the built-in sum.",
            "Rename the variable prices to price_table everywhere.",
            "Add type hints to both functions.",
            "Skip empty lines in load_prices.")],
    "questions about one document": [
        f"Read this notice:\n\n{_DOC}\n\nQuestion: {q}" for q in (
            "When does the library open on Saturdays?",
            "How many books can a member borrow, and for how long?",
            "What is the fine for returning a book late?",
            "Where is the reading room and how many desks does it have?",
            "How long can a laptop be borrowed?",
            "How much does printing cost?")],
    "log lines to JSON": [
        "Convert this log line to JSON with the keys time, level, service and message. "
        f"Reply with the JSON only.\n\n{line}" for line in (
            "2026-11-23 08:14:02 ERROR payments Card declined for order 4411",
            "2026-11-23 08:14:09 INFO auth User 88 logged in from 10.0.0.7",
            "2026-11-23 08:15:31 WARN cache Eviction rate above 40 percent",
            "2026-11-23 08:16:12 INFO payments Refund issued for order 4398",
            "2026-11-23 08:17:45 ERROR search Index shard 3 unreachable",
            "2026-11-23 08:18:03 DEBUG auth Token refreshed for user 91")],
}

# `bridge bench`'s open set plus more of its kinds, so a ratio rests on two dozen answers
OPEN_REQUESTS: list[str] = [p for _, p in BENCH_PROMPTS] + [
    "What should I pack for a three-day hiking trip in the mountains?",
    "Give me three tips for sleeping better.",
    "Why is the sky blue? Explain it to a ten-year-old.",
    "What are the pros and cons of working from home?",
    "Suggest a name for a bakery that specializes in sourdough bread, and explain it.",
    "Write a JavaScript function that returns the largest number in an array.",
    "What is the difference between a list and a tuple in Python?",
    "How do I reverse a linked list? Describe the idea in a few sentences.",
    "If a shirt costs 25 dollars after a 20 percent discount, what was the original price?",
    "A rectangle is 8 cm long and 5 cm wide. What are its area and perimeter?",
    "Explain in simple words how vaccines help the body fight disease.",
    "Describe the water cycle in four short steps.",
    "Write a haiku about a cat watching the rain.",
    "Write the opening paragraph of a mystery novel set on a night train.",
    "Invent a short fable about a fox and a crow, with a moral at the end.",
]
