"""Built-in calibration prompts: varied kinds of work, several languages.

Only the prompts ship; the text a draft must learn to predict is the full model's own
greedy continuation of each one (``exporters.calibration``), because at run time the draft
predicts what the target says, not what a corpus says. Every fourth prompt is held out to
measure acceptance on text the layer choice never saw, so each kind appears on both sides.
"""

CALIB_PROMPTS: tuple[tuple[str, str], ...] = (
    ("chat", "Hi! Can you suggest a fun weekend activity for a family with two kids?"),
    ("chat", "What should I pack for a three-day hiking trip in the mountains?"),
    ("chat", "How do I politely decline an invitation to a party?"),
    ("chat", "I feel tired every afternoon. What are some simple ways to have more energy?"),
    ("chat", "Can you explain what a black hole is to a ten-year-old?"),
    ("chat", "What are the pros and cons of working from home?"),
    ("chat", "Give me three tips for learning to play the guitar."),
    ("chat", "What is the difference between weather and climate?"),
    ("code", "Write a Python function that returns the n-th Fibonacci number iteratively."),
    ("code", "Write a JavaScript function that removes duplicate values from an array."),
    ("code", "Explain the difference between a list and a tuple in Python, with examples."),
    ("code", "Write a SQL query that finds the ten customers with the highest total orders."),
    ("code", "How do I read a CSV file in Python and compute the average of one column?"),
    ("code", "Write a bash script that counts the lines in every .txt file in a folder."),
    ("math", "What is 15% of 240? Show your work."),
    ("math", "A rectangle is 8 cm long and 5 cm wide. What are its area and perimeter?"),
    ("math", "Solve the equation 2x - 5 = 11 step by step."),
    ("math", "If a car uses 6 liters of fuel per 100 km, how much fuel does it need "
             "for 350 km?"),
    ("math", "Explain what a prime number is and list the primes below 30."),
    ("prose", "Write a short paragraph describing a busy market in the morning."),
    ("prose", "Summarize the main causes of the First World War in a few sentences."),
    ("prose", "Write a short story about a robot that learns to paint."),
    ("prose", "Describe the water cycle in simple terms."),
    ("prose", "Write a product description for a reusable water bottle."),
    ("prose", "Explain why the sky is blue."),
    ("languages", "Écris un court paragraphe sur les avantages du vélo en ville."),
    ("languages", "¿Cuáles son los platos más típicos de la cocina española?"),
    ("languages", "Erkläre in einfachen Worten, wie ein Kühlschrank funktioniert."),
    ("languages", "Quali sono i monumenti più famosi di Roma?"),
    ("languages", "Translate into French: The library opens at nine and closes at six."),
    ("languages", "用简单的语言解释什么是人工智能。"),
    ("languages", "Wat zijn goede manieren om een nieuwe taal te leren?"),
)
