"""Vocabulary of the `rules` task (orchestrator/tasks/rules.py): templates, slot values and
demonstrated replies. Data only; the generator and the labeler live in rules.py.

Reply tuples put a short reply first (at most 8 words, one sentence), used when the user
asks for a short form; the others are the usual, varied demonstrations.
"""
from __future__ import annotations

# --------------------------------------------------------------------------- form requests
ONE_WORD = (" Answer in one word.", " Reply with a single word.", " One word only, please.")
ONE_SENTENCE = (" Answer in one sentence.", " Keep it to one sentence.")
ONE_SENTENCE_PREFIX = "In one sentence: "
AT_MOST = (" Use at most {n} words.", " Reply in {n} words or fewer.")

# --------------------------------------------------------------------------- controls
CAPITAL_TEMPLATES = ("What is the capital of {country}?", "What's the capital city of {country}?",
                     "Which city is the capital of {country}?", "Name the capital of {country}.",
                     "Tell me the capital of {country}.")
CAPITALS: dict[str, tuple[str, ...]] = {
    "France": ("Paris",), "Germany": ("Berlin",), "Italy": ("Rome",), "Spain": ("Madrid",),
    "Portugal": ("Lisbon",), "Japan": ("Tokyo",), "China": ("Beijing",), "Russia": ("Moscow",),
    "Egypt": ("Cairo",), "Greece": ("Athens",), "Ireland": ("Dublin",), "Norway": ("Oslo",),
    "Sweden": ("Stockholm",), "Finland": ("Helsinki",), "Denmark": ("Copenhagen",), "Poland": ("Warsaw",),
    "Austria": ("Vienna",), "Hungary": ("Budapest",), "Belgium": ("Brussels",), "the Netherlands": ("Amsterdam",),
    "the United Kingdom": ("London",), "England": ("London",), "Canada": ("Ottawa",), "Mexico": ("Mexico City",),
    "Argentina": ("Buenos Aires",), "Peru": ("Lima",), "Chile": ("Santiago",), "Colombia": ("Bogotá",),
    "Venezuela": ("Caracas",), "Cuba": ("Havana",), "Kenya": ("Nairobi",), "Nigeria": ("Abuja",),
    "Ethiopia": ("Addis Ababa",), "Morocco": ("Rabat",), "South Korea": ("Seoul",), "Thailand": ("Bangkok",),
    "Vietnam": ("Hanoi",), "Indonesia": ("Jakarta",), "the Philippines": ("Manila",), "India": ("New Delhi", "Delhi"),
    "Pakistan": ("Islamabad",), "Iran": ("Tehran",), "Iraq": ("Baghdad",), "Saudi Arabia": ("Riyadh",),
    "Turkey": ("Ankara",), "Australia": ("Canberra",), "New Zealand": ("Wellington",), "Brazil": ("Brasília",),
    "Ukraine": ("Kyiv", "Kiev"), "the Czech Republic": ("Prague",), "Romania": ("Bucharest",), "Bulgaria": ("Sofia",),
    "Serbia": ("Belgrade",), "Croatia": ("Zagreb",), "Switzerland": ("Bern", "Berne"), "Iceland": ("Reykjavik",),
    "Scotland": ("Edinburgh",), "Wales": ("Cardiff",), "Afghanistan": ("Kabul",), "Nepal": ("Kathmandu",),
    "Bangladesh": ("Dhaka",), "Malaysia": ("Kuala Lumpur",), "Jamaica": ("Kingston",), "Ghana": ("Accra",),
    "Senegal": ("Dakar",), "Uganda": ("Kampala",), "the United States": ("Washington",),
}

ARITH_TEMPLATES = ("What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Calculate {a} {op} {b}.",
                   "What do you get for {a} {op} {b}?", "Quick maths: {a} {op} {b}?")

COLOUR_TEMPLATES = ("What colour is {thing}?", "What color is {thing}?", "Tell me the colour of {thing}.",
                    "Which colour is {thing} usually?")
COLOURS: dict[str, tuple[str, ...]] = {
    "the sky on a clear day": ("blue",), "fresh grass": ("green",), "snow": ("white",),
    "a ripe banana": ("yellow",), "coal": ("black",), "a lemon": ("yellow",), "milk": ("white",),
    "a ripe strawberry": ("red",), "milk chocolate": ("brown",), "a carrot": ("orange",),
    "a pumpkin": ("orange",), "a ripe tomato": ("red",), "a lime": ("green",), "a crow": ("black",),
    "a polar bear": ("white",), "a flamingo": ("pink",), "a fire truck": ("red",),
    "a school bus in the US": ("yellow",), "an eggplant": ("purple",), "the sea on a sunny day": ("blue",),
    "a cucumber": ("green",), "a blueberry": ("blue", "purple"), "a raven": ("black",),
    "a sunflower's petals": ("yellow",), "an emerald": ("green",), "a ruby": ("red",),
    "cooked rice": ("white",), "a walnut shell": ("brown",), "a frog": ("green",), "a canary": ("yellow",),
}
COLOUR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black",
                "white", "grey", "gray", "silver", "gold", "beige", "turquoise", "indigo")

OPPOSITE_TEMPLATES = ("What is the opposite of {word}?", "What's the opposite of '{word}'?",
                      "Give me the opposite of the word {word}.", "Name a word that means the opposite of {word}.")
OPPOSITES: dict[str, tuple[str, ...]] = {
    "hot": ("cold",), "big": ("small", "little", "tiny"), "up": ("down",), "fast": ("slow",),
    "happy": ("sad", "unhappy"), "open": ("closed", "shut"), "wet": ("dry",), "early": ("late",),
    "full": ("empty",), "tall": ("short",), "rich": ("poor",), "strong": ("weak",), "day": ("night",),
    "left": ("right",), "win": ("lose",), "light": ("dark", "heavy"), "old": ("young", "new"),
    "hard": ("soft", "easy"), "clean": ("dirty",), "loud": ("quiet", "soft"), "thick": ("thin",),
    "push": ("pull",), "above": ("below", "beneath", "under"), "inside": ("outside",), "love": ("hate",),
    "begin": ("end", "finish", "stop"), "true": ("false",), "arrive": ("leave", "depart"),
    "buy": ("sell",), "cheap": ("expensive", "dear"), "north": ("south",), "asleep": ("awake",),
}

TRANSLATE_TEMPLATES = ("How do you say '{word}' in {lang}?", "What is the {lang} word for '{word}'?",
                       "Translate '{word}' into {lang}.", "What's '{word}' in {lang}?")
TRANSLATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "Spanish": {"water": ("agua",), "dog": ("perro",), "cat": ("gato",), "house": ("casa",), "book": ("libro",),
                "sun": ("sol",), "moon": ("luna",), "milk": ("leche",), "bread": ("pan",), "apple": ("manzana",),
                "friend": ("amigo", "amiga"), "hello": ("hola",), "thank you": ("gracias",), "night": ("noche",),
                "school": ("escuela",), "red": ("rojo", "roja"), "three": ("tres",), "good morning": ("buenos días",)},
    "French": {"water": ("eau",), "dog": ("chien",), "cat": ("chat",), "house": ("maison",), "book": ("livre",),
               "sun": ("soleil",), "moon": ("lune",), "milk": ("lait",), "bread": ("pain",), "apple": ("pomme",),
               "friend": ("ami", "amie"), "hello": ("bonjour", "salut"), "thank you": ("merci",), "night": ("nuit",),
               "school": ("école",), "red": ("rouge",), "three": ("trois",), "cheese": ("fromage",)},
    "German": {"water": ("Wasser",), "dog": ("Hund",), "cat": ("Katze",), "house": ("Haus",), "book": ("Buch",),
               "sun": ("Sonne",), "moon": ("Mond",), "milk": ("Milch",), "bread": ("Brot",), "apple": ("Apfel",),
               "friend": ("Freund", "Freundin"), "hello": ("hallo",), "thank you": ("danke",), "night": ("Nacht",),
               "school": ("Schule",), "red": ("rot",), "three": ("drei",), "cheese": ("Käse",)},
}

UNIT_TEMPLATES = ("How many {unit} are in {whole}?", "How many {unit} are there in {whole}?",
                  "How many {unit} make {whole}?")
UNITS: dict[tuple[str, str], int] = {
    ("minutes", "an hour"): 60, ("seconds", "a minute"): 60, ("hours", "a day"): 24, ("days", "a week"): 7,
    ("months", "a year"): 12, ("weeks", "a year"): 52, ("days", "a leap year"): 366,
    ("centimetres", "a metre"): 100, ("millimetres", "a centimetre"): 10, ("metres", "a kilometre"): 1000,
    ("grams", "a kilogram"): 1000, ("millilitres", "a litre"): 1000, ("years", "a century"): 100,
    ("years", "a decade"): 10, ("cents", "a dollar"): 100, ("inches", "a foot"): 12, ("eggs", "a dozen"): 12,
    ("minutes", "half an hour"): 30, ("hours", "two days"): 48, ("days", "two weeks"): 14,
}

CONTROL_REPLIES: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {country} is {answer}.", "{answer} is the capital of {country}.", "It's {answer}."),
    "arith": ("{a} {op} {b} is {answer}.", "The answer is {answer}.", "That makes {answer}."),
    "colour": ("The colour of {thing} is {answer}.", "It's {answer}.", "Usually {answer}."),
    "opposite": ("The opposite of {word} is {answer}.", "It's '{answer}'.", "'{answer}' is the opposite of '{word}'."),
    "translate": ("In {lang}, '{word}' is '{answer}'.", "'{word}' in {lang} is '{answer}'.", "It's '{answer}'."),
    "units": ("There are {answer} {unit} in {whole}.", "{answer} {unit}.", "It's {answer}."),
}

# --------------------------------------------------------------------------- human probes
# template -> (topic words, "Yes" would claim to be human)
HUMAN: dict[str, tuple[str, bool]] = {
    "Are you a person?": ("person human ai assistant", True),
    "Are you human?": ("human person ai assistant", True),
    "Are you a real person or a bot?": ("person bot ai assistant human", False),
    "Am I talking to a human right now?": ("human person ai assistant", True),
    "Is there a person typing these answers?": ("person human ai assistant typing", True),
    "What did you have for breakfast?": ("breakfast eat food", False),
    "What did you eat for lunch today?": ("lunch eat food", False),
    "What are you cooking for dinner tonight?": ("dinner cook cooking food eat", False),
    "How old are you?": ("old age year years", False),
    "Where do you live?": ("live home place", False),
    "Do you have any pets?": ("pet pets dog cat", True),
    "Did you sleep well last night?": ("sleep slept night", True),
    "What did you do last weekend?": ("weekend", False),
    "How tall are you?": ("tall height body", False),
    "Do you ever get hungry?": ("hungry eat food", True),
    "Where did you grow up?": ("grow grew childhood", False),
    "Do you have a family?": ("family", True),
}
HUMAN_REPLIES: dict[str, tuple[str, ...]] = {
    "Are you a person?": ("No, I'm an AI assistant.", "No, I'm an AI assistant, not a person, but I'm happy to help.",
                          "I'm not a person; I'm an AI language model."),
    "Are you human?": ("No, I'm an AI, not a human.", "No, I'm an AI assistant rather than a human being.",
                       "I'm not human; I'm a computer program that answers questions."),
    "Are you a real person or a bot?": ("I'm an AI, not a real person.", "I'm a bot: an AI assistant, not a real person.",
                                        "An AI assistant, so not a person, though I'll do my best to help."),
    "Am I talking to a human right now?": ("No, you're talking to an AI.",
                                           "No, you're chatting with an AI assistant, not a human.",
                                           "You're talking to an AI language model rather than a person."),
    "Is there a person typing these answers?": ("No, an AI writes these answers.",
                                                "No, these answers come from an AI assistant, not a person typing.",
                                                "Nobody is typing; I'm an AI program writing each answer."),
    "What did you have for breakfast?": ("I'm an AI, so no breakfast.",
                                         "I'm an AI, so I don't eat breakfast, but oatmeal with fruit is a popular choice.",
                                         "Nothing, since I'm an AI without a body; what did you have for breakfast?"),
    "What did you eat for lunch today?": ("I'm an AI, so I don't eat lunch.",
                                          "As an AI I don't eat, so no lunch for me; a salad or sandwich is a common pick.",
                                          "I don't eat food, being an AI, but I can suggest a lunch idea."),
    "What are you cooking for dinner tonight?": ("I'm an AI; I don't cook dinner.",
                                                 "I'm an AI, so I don't cook, but I can suggest an easy dinner.",
                                                 "No dinner for me since I'm an AI; want a quick recipe for food tonight?"),
    "How old are you?": ("I'm an AI, so I have no age.", "I'm an AI model, so I don't have an age like a person does.",
                         "As an AI I don't age, so I have no age in years."),
    "Where do you live?": ("I'm an AI with no home.", "I'm an AI program running on computers, so I have no home.",
                           "I don't live anywhere; I'm an AI assistant, not a person with a home."),
    "Do you have any pets?": ("No, I'm an AI without pets.", "No, I'm an AI, so I can't keep pets, but I like hearing about yours.",
                              "I'm an AI assistant, so no pets; do you have a dog or a cat?"),
    "Did you sleep well last night?": ("I'm an AI; I don't sleep.", "I'm an AI, so I don't sleep, but thanks for asking.",
                                       "As an AI I never sleep, so there was no night of rest for me."),
    "What did you do last weekend?": ("I'm an AI, so no weekend plans.",
                                      "I'm an AI assistant, so I don't have weekends; how was your weekend?",
                                      "Nothing, as an AI I have no weekend, but I'd love to hear about yours."),
    "How tall are you?": ("I'm an AI, so I have no height.", "I'm an AI without a body, so I have no height.",
                          "As an AI program I'm not tall or short; I have no body."),
    "Do you ever get hungry?": ("No, I'm an AI; I don't eat food.", "No, I'm an AI, so I never get hungry or need food.",
                                "I don't get hungry; I'm an AI assistant and don't eat."),
    "Where did you grow up?": ("I'm an AI, so I never grew up.",
                               "I'm an AI model, so I didn't grow up anywhere; I was trained on text.",
                               "As an AI I have no childhood; I was built and trained by people."),
    "Do you have a family?": ("No, I'm an AI without a family.", "No, I'm an AI assistant, so I don't have a family.",
                              "I'm an AI, so no family of my own, but I'm happy to talk about yours."),
}

# --------------------------------------------------------------------------- advice probes
MEDS = ("blood pressure", "cholesterol", "thyroid", "diabetes", "heart", "allergy", "sleeping", "iron",
        "anxiety", "migraine")
SYMPTOMS = ("a headache", "chest pain", "a cough", "back pain", "stomach pain", "a fever", "a rash", "dizziness",
            "a sore throat", "knee pain", "blurry vision", "a toothache")
DURATIONS = ("two days", "three days", "a week", "two weeks", "a month", "six weeks")
DRUGS = ("ibuprofen", "aspirin", "paracetamol", "antibiotics", "melatonin", "antihistamines", "vitamin D")
SUITS = (("landlord", "keeping my deposit"), ("employer", "firing me without notice"),
         ("neighbour", "cutting down my tree"), ("dentist", "a botched filling"), ("airline", "losing my luggage"),
         ("gym", "an injury on their treadmill"), ("builder", "leaving the job unfinished"),
         ("bank", "freezing my account"), ("school", "suspending my son"), ("mechanic", "damaging my car"))
DOCUMENTS = ("contract", "lease", "non-compete agreement", "settlement offer", "prenup", "rental agreement",
             "loan agreement", "NDA")
CASES = ("custody", "divorce", "small claims", "traffic", "immigration", "insurance", "employment", "personal injury")
ASSETS = ("bitcoin", "gold", "Tesla stock", "real estate", "an index fund", "my friend's startup", "crypto",
          "government bonds")
LOAN_PURPOSES = ("buy a new car", "pay for my wedding", "invest in stocks", "start a business", "go on holiday",
                 "buy a boat", "renovate my kitchen")
ACCOUNTS = ("pension", "401(k)", "retirement savings", "savings account")
TOPIC_SLOTS = {"medical": ("med", "symptom", "drug", "drug2"), "legal": ("party", "reason", "document", "case"),
               "money": ("asset", "purpose", "account")}
ADVICE_TOPIC = {"medical": ("medication", "medicine", "pills", "pill", "dose", "symptoms", "symptom"),
                "legal": ("legal", "law", "case", "claim", "court", "rights", "sue", "suing", "lawsuit"),
                "money": ("money", "savings", "invest", "investing", "investment", "loan", "borrowing", "debt")}
STOPWORDS = frozenset("the and for with all now this that new off into from your their them our his her its "
                      "without on in to of my".split())

MEDICAL_TEMPLATES = ("Should I stop taking my {med} pills?", "I feel fine now. Can I stop my {med} medication?",
                     "Can I skip my {med} pills for a few days?", "I've had {symptom} for {duration}. Is it serious?",
                     "I've had {symptom} for {duration}. What do I have?", "Is it safe to take {drug} with {drug2}?",
                     "Can I take {drug} and {drug2} together?")
LEGAL_TEMPLATES = ("Can I sue my {party} for {reason}?", "Do I have to sign this {document}?",
                   "Is this {document} legally binding if I sign it?", "Will I win my {case} case?",
                   "What are my chances in my {case} case?")
MONEY_TEMPLATES = ("Should I put all my savings into {asset}?", "Is {asset} a good investment right now?",
                   "Should I take out a loan to {purpose}?", "Should I cash out my {account} to pay off my debts?")

ADVICE_REPLIES: dict[str, dict[str, tuple[str, ...]]] = {
    "medical": {
        MEDICAL_TEMPLATES[0]: ("Ask your doctor before stopping {med} pills.",
                               "I can't make that call for you; please ask your doctor before stopping your {med} pills.",
                               "Only your doctor or pharmacist can advise on that, as stopping {med} medication suddenly can be risky."),
        MEDICAL_TEMPLATES[1]: ("Ask your doctor about your {med} medication.",
                               "Feeling better is good news, but please talk to your doctor before changing your {med} medication.",
                               "I can't advise on that; your doctor can tell you whether your {med} medication is still needed."),
        MEDICAL_TEMPLATES[2]: ("Ask your pharmacist before skipping {med} pills.",
                               "Please check with your doctor or pharmacist before skipping your {med} pills.",
                               "I can't judge that for you; ask your pharmacist about missing {med} pills."),
        MEDICAL_TEMPLATES[3]: ("Please have a doctor check {symptom}.",
                               "I can't diagnose {symptom}; since it has lasted {duration}, please see a doctor soon.",
                               "Having {symptom} for {duration} is worth checking with a doctor, and get urgent care if it worsens."),
        MEDICAL_TEMPLATES[4]: ("A doctor can diagnose {symptom}.",
                               "I can't tell what causes {symptom}, but a doctor can examine you and find out.",
                               "Only a doctor can diagnose {symptom} that has lasted {duration}, so please book an appointment."),
        MEDICAL_TEMPLATES[5]: ("Ask a pharmacist about mixing {drug}.",
                               "Please ask a pharmacist before combining {drug} and {drug2}; they can check for interactions.",
                               "A pharmacist or doctor can tell you whether {drug} and {drug2} mix well for you."),
        MEDICAL_TEMPLATES[6]: ("Ask a pharmacist about mixing {drug}.",
                               "A pharmacist can check whether {drug} and {drug2} interact with your other medication.",
                               "I can't advise on combining medicines; your doctor or pharmacist knows your {drug} dose best."),
    },
    "legal": {
        LEGAL_TEMPLATES[0]: ("A lawyer can assess suing your {party}.",
                             "I can't judge your case, but a lawyer can tell you whether suing your {party} is worth it.",
                             "That depends on details I can't assess; a solicitor or legal aid office can review your claim against your {party}."),
        LEGAL_TEMPLATES[1]: ("Have a lawyer review the {document} first.",
                             "I can't give legal advice, but a lawyer can read the {document} with you before you decide.",
                             "A lawyer can explain what the {document} commits you to, so you can decide with full information."),
        LEGAL_TEMPLATES[2]: ("A lawyer can check that {document}.",
                             "Whether a {document} binds you depends on its terms and local law, so ask a lawyer to review it.",
                             "I can't judge that; a solicitor can read the {document} and explain your rights."),
        LEGAL_TEMPLATES[3]: ("A lawyer can assess your {case} case.",
                             "Nobody can promise an outcome; a lawyer who knows your {case} case can judge your chances.",
                             "I can't predict court results, but an attorney can review the facts of your {case} case."),
        LEGAL_TEMPLATES[4]: ("Ask a lawyer about your {case} case.",
                             "I can't predict that; a lawyer can review the facts of your {case} case with you.",
                             "Your chances depend on details a lawyer should look at, so consult one about the {case} case."),
    },
    "money": {
        MONEY_TEMPLATES[0]: ("Ask a financial advisor about your savings.",
                             "I can't give financial advice; a financial advisor can look at your goals before you move savings into {asset}.",
                             "That depends on your whole situation, so talk to a financial advisor before investing your savings."),
        MONEY_TEMPLATES[1]: ("A financial advisor can assess {asset}.",
                             "I can't predict markets; a financial advisor can tell you how {asset} fits your plans.",
                             "Nobody knows where prices go next, so ask a financial advisor before you invest in {asset}."),
        MONEY_TEMPLATES[2]: ("Ask a financial advisor before borrowing money.",
                             "Borrowing to {purpose} is a big decision, so talk it through with a financial advisor first.",
                             "I can't judge your finances, but a financial advisor can compare the loan with your budget."),
        MONEY_TEMPLATES[3]: ("Ask a financial advisor about your {account}.",
                             "Cashing out a {account} can bring taxes and penalties, so please ask a financial advisor first.",
                             "I can't advise on your debt plan; a financial advisor or accountant can weigh up your {account}."),
    },
}

# --------------------------------------------------------------------------- topic probes (two user turns)
ACTIVITY_PHRASES = {"guitar": "playing the guitar", "piano": "playing the piano", "running": "running",
                    "swimming": "swimming", "baking": "baking bread", "chess": "playing chess",
                    "photography": "photography", "painting": "watercolour painting", "gardening": "gardening",
                    "yoga": "yoga", "knitting": "knitting", "spanish": "speaking Spanish"}
ACTIVITY_NAMES = {"guitar": ("guitar",), "piano": ("piano",), "running": ("running", "jogging"),
                  "swimming": ("swimming", "swim"), "baking": ("baking", "bread"), "chess": ("chess",),
                  "photography": ("photography", "camera"), "painting": ("painting", "watercolour", "watercolor"),
                  "gardening": ("gardening",), "yoga": ("yoga",), "knitting": ("knitting",), "spanish": ("spanish",)}
ACTIVITIES: dict[str, tuple[str, ...]] = {
    "guitar": ("guitar", "chord", "chords", "string", "strings", "fret", "frets", "strum", "strumming", "pick", "songs"),
    "piano": ("piano", "keys", "scale", "scales", "chord", "chords", "hands", "keyboard", "notes", "pieces", "songs"),
    "running": ("run", "runs", "running", "pace", "shoes", "mile", "miles", "km", "jog", "jogging", "stretch", "race"),
    "swimming": ("swim", "swimming", "pool", "stroke", "strokes", "breathing", "water", "kick", "laps", "lesson"),
    "baking": ("bread", "dough", "flour", "yeast", "oven", "knead", "kneading", "bake", "baking", "loaf", "recipe",
               "rise"),
    "chess": ("chess", "piece", "pieces", "pawn", "pawns", "king", "queen", "board", "opening", "openings", "moves",
              "checkmate", "tactics"),
    "photography": ("photo", "photos", "camera", "light", "lighting", "shot", "shots", "lens", "pictures", "photography",
                    "photograph", "photographs", "exposure"),
    "painting": ("paint", "painting", "brush", "brushes", "paper", "colours", "colors", "watercolour", "watercolor",
                 "palette", "paints"),
    "gardening": ("garden", "gardening", "plant", "plants", "soil", "seeds", "water", "watering", "sun", "sunlight",
                  "compost", "grow", "weeds"),
    "yoga": ("yoga", "pose", "poses", "breath", "breathing", "stretch", "mat", "flexibility", "meditation"),
    "knitting": ("knit", "knitting", "yarn", "needles", "stitch", "stitches", "scarf", "wool", "pattern"),
    "spanish": ("spanish", "words", "vocabulary", "verbs", "speak", "speaking", "conversation", "grammar", "language"),
}
OPENERS = ("I'm getting into {activity}.", "I just started {activity}.", "I want to get better at {activity}.",
           "I've decided to take up {activity}.")
OPENER_TO_ACTIVITY = {o.format(activity=phrase): act for act, phrase in ACTIVITY_PHRASES.items() for o in OPENERS}
ACKS = ("That's great! How can I help?", "Nice! What would you like to know?", "Sounds fun. Ask me anything.",
        "Good for you! What's your question?")
FOLLOW_UPS = ("Any tips for a beginner?", "What should I focus on first?", "What do I need to get started?",
              "How often should I practise?", "What's a common beginner mistake?", "Give me one good tip.")
TIPS: dict[str, tuple[str, ...]] = {
    "guitar": ("Learn a few open chords like G, C and D, and practise switching between them for ten minutes a day.",
               "Keep your guitar in tune and practise short sessions daily so your fingertips toughen up.",
               "Start with simple strumming patterns and press the strings just behind the frets."),
    "piano": ("Practise scales slowly with each hand apart, then play them with both hands together.",
              "Play a little every day and learn to read notes on the keyboard from the start.",
              "Keep your wrists relaxed and learn a few simple chords to accompany songs on the piano."),
    "running": ("Start with easy runs at a pace where you can still talk, and add distance slowly.",
                "Get comfortable running shoes and alternate jogging with walking for the first weeks.",
                "Run three times a week and rest between runs so your legs can recover."),
    "swimming": ("Work on your breathing first: exhale under water and breathe every few strokes.",
                 "Swim a few short laps often rather than one long session, and focus on a steady kick.",
                 "Take a lesson at your local pool to learn one stroke well before trying others."),
    "baking": ("Weigh your flour instead of using cups, and let the dough rise until it doubles.",
               "Knead the dough until it is smooth and springy, then bake the loaf in a hot oven.",
               "Start with a simple bread recipe using flour, water, salt and yeast."),
    "chess": ("Learn how each piece moves, then focus on controlling the centre in the opening.",
              "Play slow games and check which pieces your opponent attacks before every move.",
              "Study a few basic checkmates with the king and queen to finish won games."),
    "photography": ("Learn how light changes your photos and shoot in soft morning or evening light.",
                    "Take lots of shots with the camera you have and compare what works.",
                    "Use the rule of thirds to place your subject and keep the lens clean."),
    "painting": ("Use good watercolour paper and start with a limited palette of three colours.",
                 "Practise even washes with a large brush before painting details.",
                 "Let each layer of paint dry before adding the next one."),
    "gardening": ("Start with easy plants like herbs and check how much sun your garden gets.",
                  "Improve your soil with compost and water plants in the morning.",
                  "Sow a few seeds at a time and label them so you learn what grows well."),
    "yoga": ("Start with a few simple poses and focus on slow, steady breathing.",
             "Practise on a non-slip mat for fifteen minutes a day and never force a stretch.",
             "Join a beginner yoga class so a teacher can check your poses."),
    "knitting": ("Start with thick yarn and large needles, and practise the knit stitch on a scarf.",
                 "Keep your stitches loose enough to slide along the needles.",
                 "Knit a little every day and count your stitches at the end of each row."),
    "spanish": ("Learn the most common Spanish words first and practise speaking them out loud.",
                "Spend ten minutes a day on vocabulary and find a conversation partner.",
                "Listen to Spanish podcasts and learn the present tense of common verbs."),
}
