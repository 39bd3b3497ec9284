"""
bAbI qa1-qa5: the release-file parser, a simulator of the world, and a seeded generator
(reference/evals.md §1.7-1.8; Weston et al., arXiv 1502.05698).

    stories = read_babi(babi_path(1, "test", data_dir))   # list of stories, each a list of BabiLine
    samples = babi_samples(stories)                        # BABILong step 1: one sample per question
    report  = replay_stories(stories)                      # the simulator answers every question
    stories = generate_babi(task=2, n_stories=100, seed=0) # new stories, same format and rules

Release format: each line is `N text` or `N question\\tanswer\\tsupport ids`; N == 1 starts a
new story. The simulator reads the statements in order and keeps what they reveal
(who is where, who holds what, where each object has been, who gave what to whom, the
spatial relations); it answers every question from that knowledge alone and records
every violation of the world rules it can see. The generator acts in a hidden "true"
world that obeys the rules by construction, writes what happens as statements, and asks
the simulator which questions the text makes answerable and what their answers are, so
generated and released stories are answered by one and the same code.

The world rules and the statistics the generator follows (verb synonyms, " there",
question types and rates) are those of evals.md §1.8, measured on the released files.
"""
from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass, field

from cli import read_text

# -----------------------------------------------------------------------------
# vocabulary (evals.md §1.8 "Common world")

ACTORS = ("Mary", "John", "Daniel", "Sandra")           # qa1-qa3
ACTORS_QA5 = ("Bill", "Fred", "Jeff", "Mary")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
GET_VERBS = ("got", "grabbed", "picked up", "took")
DROP_VERBS = ("discarded", "dropped", "left", "put down")
GIVE_VERBS = ("gave", "handed", "passed")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
AXES = (("north", "south"), ("west", "east"))        # (towards the first, towards the last)

TASK_FILE_STEMS = {
    1: "qa1_single-supporting-fact",
    2: "qa2_two-supporting-facts",
    3: "qa3_three-supporting-facts",
    4: "qa4_two-arg-relations",
    5: "qa5_three-arg-relations",
}
# BABILong's TASK_LABELS (evals.md §1.3): the answer vocabulary of each task.
TASK_LABELS = {
    "qa1": list(LOCATIONS), "qa2": list(LOCATIONS), "qa3": list(LOCATIONS), "qa4": list(LOCATIONS),
    "qa5": ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"],
}


def task_number(task) -> int:
    """'qa3' | 3 | '3' -> 3; only qa1-qa5 are modelled."""
    text = str(task).strip().lower()
    number = text[2:] if text.startswith("qa") else text
    if not number.isdigit() or int(number) not in TASK_FILE_STEMS:
        raise ValueError(f"unknown bAbI task {task!r}; valid: qa1, qa2, qa3, qa4, qa5")
    return int(number)


# -----------------------------------------------------------------------------
# 1. the release format

@dataclass
class BabiLine:
    """One numbered line of a story. A question carries its answer and supporting line ids."""
    id: int
    text: str
    answer: str | None = None
    supports: tuple = ()

    @property
    def is_question(self) -> bool:
        return self.answer is not None

    def format(self) -> str:
        if not self.is_question:
            return f"{self.id} {self.text}"
        return f"{self.id} {self.text}\t{self.answer}\t{' '.join(map(str, self.supports))}"


def parse_babi(text: str, source: str = "<text>") -> list[list[BabiLine]]:
    """Release-format text -> stories. Raises ValueError naming the first malformed line."""
    stories: list[list[BabiLine]] = []
    for line_no, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        head, _, rest = raw.partition(" ")
        if not head.isdigit() or not rest:
            raise ValueError(f"{source}:{line_no}: expected 'N text', got {raw[:60]!r}")
        line_id = int(head)
        if "\t" in rest:
            parts = rest.split("\t")
            if len(parts) != 3:
                raise ValueError(f"{source}:{line_no}: a question line needs 'question<TAB>answer<TAB>ids'")
            question, answer, support_text = parts
            try:
                supports = tuple(int(s) for s in support_text.split())
            except ValueError:
                raise ValueError(f"{source}:{line_no}: support ids must be integers, got {support_text!r}") from None
            line = BabiLine(line_id, question.strip(), answer.strip(), supports)
        else:
            line = BabiLine(line_id, rest.strip())
        if line_id == 1:
            stories.append([])
        elif not stories or stories[-1][-1].id != line_id - 1:
            raise ValueError(f"{source}:{line_no}: line id {line_id} does not follow the previous line")
        stories[-1].append(line)
    return stories


def format_babi(stories) -> str:
    return "".join(line.format() + "\n" for story in stories for line in story)


def read_babi(path: str) -> list[list[BabiLine]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bAbI file {path} not found")
    return parse_babi(read_text(path), source=path)


def babi_path(task, split: str, data_dir: str) -> str:
    """<data_dir>/babi/en/qaN_<name>_<split>.txt (data_dir = a copy of shared/data)."""
    if split not in ("train", "test"):
        raise ValueError(f"bAbI split must be 'train' or 'test', got {split!r}")
    number = task_number(task)
    return os.path.join(data_dir, "babi", "en", f"{TASK_FILE_STEMS[number]}_{split}.txt")


def babi_samples(stories) -> list[dict]:
    """BABILong construction step 1 (evals.md §1.2): every question becomes one sample whose
    facts are all earlier statements of its story (earlier questions dropped). `support`
    indexes into `facts`."""
    samples = []
    for story in stories:
        facts, index_of_id = [], {}
        for line in story:
            if line.is_question:
                support = [index_of_id[s] for s in line.supports if s in index_of_id]
                samples.append({"facts": list(facts), "question": line.text, "answer": line.answer,
                                "support": support})
            else:
                index_of_id[line.id] = len(facts)
                facts.append(line.text)
    return samples


# -----------------------------------------------------------------------------
# 2. statements and questions as events

_NAME = r"([A-Z][a-z]+)"
_WORD = r"([a-z]+)"
_STATEMENT_PATTERNS = [
    ("move", re.compile(rf"^{_NAME} (?:{'|'.join(MOVE_VERBS)}) the {_WORD}\.$")),
    ("get", re.compile(rf"^{_NAME} (?:{'|'.join(GET_VERBS)}) the {_WORD}(?: there)?\.$")),
    ("drop", re.compile(rf"^{_NAME} (?:{'|'.join(DROP_VERBS)}) the {_WORD}(?: there)?\.$")),
    ("give", re.compile(rf"^{_NAME} (?:{'|'.join(GIVE_VERBS)}) the {_WORD} to {_NAME}\.$")),
    ("relation", re.compile(rf"^The {_WORD} is (north|south|east|west) of the {_WORD}\.$")),
]
_QUESTION_PATTERNS = [
    ("where_actor", re.compile(rf"^Where is {_NAME}\?$")),
    ("where_object", re.compile(rf"^Where is the {_WORD}\?$")),
    ("where_before", re.compile(rf"^Where was the {_WORD} before the {_WORD}\?$")),
    ("what_is_x_dir_of", re.compile(rf"^What is the {_WORD} (north|south|east|west) of\?$")),
    ("what_is_dir_of_x", re.compile(rf"^What is (north|south|east|west) of the {_WORD}\?$")),
    ("what_did_give", re.compile(rf"^What did {_NAME} give to {_NAME}\?$")),
    ("who_gave_to", re.compile(rf"^Who gave the {_WORD} to {_NAME}\?$")),
    ("who_gave", re.compile(rf"^Who gave the {_WORD}\?$")),
    ("who_did_give_to", re.compile(rf"^Who did {_NAME} give the {_WORD} to\?$")),
    ("who_received", re.compile(rf"^Who received the {_WORD}\?$")),
]


def _parse(text: str, patterns, what: str) -> tuple:
    """(kind, *captured groups) of the first pattern that matches `text`; ValueError if none does."""
    for kind, pattern in patterns:
        match = pattern.match(text.strip())
        if match:
            return (kind, *match.groups())
    raise ValueError(f"not a qa1-qa5 {what}: {text!r}")


def parse_statement(text: str) -> tuple:
    """'John went to the hallway.' -> ('move', 'John', 'hallway'); ValueError if unknown."""
    return _parse(text, _STATEMENT_PATTERNS, "statement")


def parse_question(text: str) -> tuple:
    """'Where is Mary?' -> ('where_actor', 'Mary'); ValueError if unknown."""
    return _parse(text, _QUESTION_PATTERNS, "question")


# -----------------------------------------------------------------------------
# 3. the simulator: what the text so far reveals

@dataclass
class _Arrival:
    location: str
    line: int            # the statement that put the object there


@dataclass
class BabiWorld:
    """Knowledge gained from the statements read so far. A location is None until the text
    reveals it. Co-location is used both ways: an actor who gets an object where it lies,
    or gives to someone, shares that place (the rules say so), which fixes an unknown one."""
    actor_location: dict = field(default_factory=dict)     # actor -> (location, line that revealed it)
    holder: dict = field(default_factory=dict)             # object -> (actor, get/give line)
    object_location: dict = field(default_factory=dict)    # object (not held) -> (location or None, [lines])
    last_event: dict = field(default_factory=dict)         # object -> its latest get/drop/give line
    history: dict = field(default_factory=dict)            # object -> [_Arrival], distinct consecutive places
    gives: list = field(default_factory=list)              # (giver, object, receiver, line)
    relations: list = field(default_factory=list)          # (a, direction, b, line): a is direction of b
    violations: list = field(default_factory=list)

    def _where_actor(self, actor):
        return self.actor_location.get(actor, (None, None))

    def where_object(self, obj):
        """(location or None, [lines that show it])."""
        if obj in self.holder:
            carrier, get_line = self.holder[obj]
            location, move_line = self._where_actor(carrier)
            return location, [get_line] + ([move_line] if move_line is not None else [])
        return self.object_location.get(obj, (None, []))

    def _arrive(self, obj, location, line):
        if location is None:
            return
        trail = self.history.setdefault(obj, [])
        if not trail or trail[-1].location != location:
            trail.append(_Arrival(location, line))

    def _set_actor_location(self, actor, location, line):
        self.actor_location[actor] = (location, line)
        for obj, (carrier, _) in self.holder.items():
            if carrier == actor:
                self._arrive(obj, location, line)

    def apply(self, text: str, line: int):
        event = parse_statement(text)
        kind = event[0]
        if kind in ("get", "drop", "give"):
            self.last_event[event[2]] = line
        if kind == "move":
            _, actor, location = event
            if self._where_actor(actor)[0] == location:
                self.violations.append(f"line {line}: {actor} moves to the {location}, where they already are")
            self._set_actor_location(actor, location, line)
        elif kind == "get":
            _, actor, obj = event
            if obj in self.holder:
                self.violations.append(f"line {line}: {actor} gets the {obj}, held by {self.holder[obj][0]}")
            actor_at, object_at = self._where_actor(actor)[0], self.where_object(obj)[0]
            if actor_at is not None and object_at is not None and actor_at != object_at:
                self.violations.append(f"line {line}: {actor} in the {actor_at} gets the {obj} in the {object_at}")
            if actor_at is None and object_at is not None:
                self._set_actor_location(actor, object_at, line)
            self.object_location.pop(obj, None)
            self.holder[obj] = (actor, line)
            self._arrive(obj, self._where_actor(actor)[0], line)
        elif kind == "drop":
            _, actor, obj = event
            if self.holder.get(obj, (None,))[0] != actor:
                self.violations.append(f"line {line}: {actor} drops the {obj} without holding it")
            self.holder.pop(obj, None)
            location, move_line = self._where_actor(actor)
            # the object lies where the dropper was: the drop and the dropper's move show it
            self.object_location[obj] = (location, [line] + ([move_line] if move_line is not None else []))
            self._arrive(obj, location, line)
        elif kind == "give":
            _, giver, obj, receiver = event
            if self.holder.get(obj, (None,))[0] != giver:
                self.violations.append(f"line {line}: {giver} gives the {obj} without holding it")
            giver_at, receiver_at = self._where_actor(giver)[0], self._where_actor(receiver)[0]
            if giver_at is not None and receiver_at is not None and giver_at != receiver_at:
                self.violations.append(f"line {line}: {giver} in the {giver_at} gives to {receiver} "
                                       f"in the {receiver_at}")
            if giver_at is None and receiver_at is not None:
                self._set_actor_location(giver, receiver_at, line)
            elif receiver_at is None and giver_at is not None:
                self._set_actor_location(receiver, giver_at, line)
            self.object_location.pop(obj, None)
            self.holder[obj] = (receiver, line)
            self.gives.append((giver, obj, receiver, line))
        else:
            _, a, direction, b = event
            self.relations.append((a, direction, b, line))

    def answer(self, question: str):
        """(answer, supporting lines), or (None, []) when the text does not determine it."""
        kind, *args = parse_question(question)
        if kind == "where_actor":
            location, line = self._where_actor(args[0])
            return (location, [line]) if location is not None else (None, [])
        if kind == "where_object":
            location, lines = self.where_object(args[0])
            return (location, lines) if location is not None else (None, [])
        if kind == "where_before":
            # the place just before the object's LAST arrival at L (evals.md §1.8 qa3)
            obj, place = args
            trail = self.history.get(obj, [])
            for i in range(len(trail) - 1, 0, -1):
                if trail[i].location == place:
                    # support: the object's latest get/drop, its arrival at L, the arrival before
                    lines = [self.last_event[obj], trail[i].line, trail[i - 1].line]
                    return trail[i - 1].location, list(dict.fromkeys(lines))
            return None, []
        if kind in ("what_is_x_dir_of", "what_is_dir_of_x"):
            if kind == "what_is_x_dir_of":      # "What is the X D of?": X is D of ?
                subject, direction = args
            else:                               # "What is D of the X?": ? is D of X, i.e. X is D' of ?
                direction, subject = args
                direction = OPPOSITE[direction]
            found = {}
            for a, d, b, line in self.relations:
                if a == subject and d == direction:
                    found.setdefault(b, line)
                elif b == subject and d == OPPOSITE[direction]:   # "b is D' of X" read inversely
                    found.setdefault(a, line)
            if len(found) == 1:
                (answer, line), = found.items()
                return answer, [line]
            return None, []
        # qa5: the most recent give that matches the question's arguments
        matches = {
            "what_did_give": lambda g: (g[0], g[2]) == tuple(args),
            "who_gave_to": lambda g: (g[1], g[2]) == tuple(args),
            "who_gave": lambda g: g[1] == args[0],
            "who_did_give_to": lambda g: (g[0], g[1]) == tuple(args),
            "who_received": lambda g: g[1] == args[0],
        }[kind]
        answer_field = {"what_did_give": 1, "who_gave_to": 0, "who_gave": 0, "who_did_give_to": 2,
                        "who_received": 2}[kind]
        for give in reversed(self.gives):
            if matches(give):
                return give[answer_field], [give[3]]
        return None, []


def replay_story(story) -> tuple[list[dict], list[str]]:
    """Run one story through the simulator: (one record per question, rule violations)."""
    world = BabiWorld()
    records = []
    for line in story:
        if line.is_question:
            predicted, supports = world.answer(line.text)
            records.append({"id": line.id, "question": line.text, "answer": line.answer,
                            "predicted": predicted, "supports": supports})
        else:
            world.apply(line.text, line.id)
    return records, world.violations


def replay_stories(stories) -> dict:
    """Answer agreement of the simulator with the stories' own answers, and rule violations."""
    total, agree, mismatches, violations = 0, 0, [], []
    for story_index, story in enumerate(stories):
        records, story_violations = replay_story(story)
        violations += [f"story {story_index}: {v}" for v in story_violations]
        for record in records:
            total += 1
            if record["predicted"] == record["answer"]:
                agree += 1
            else:
                mismatches.append({"story": story_index, **record})
    return {"questions": total, "agree": agree, "accuracy": agree / max(total, 1),
            "mismatches": mismatches, "violations": violations}


# -----------------------------------------------------------------------------
# 4. the generator (evals.md §1.8): a hidden true world, statements in pairs, questions
#    asked only when the text so far answers them

# Relative rates of the actions and of " there", measured on the released en train files.
_ACTION_WEIGHTS = {
    2: {"move": 0.60, "get": 0.22, "drop": 0.18},
    3: {"move": 0.60, "get": 0.21, "drop": 0.19},
    5: {"move": 0.50, "get": 0.17, "drop": 0.12, "give": 0.21},
}
_THERE_RATE = {2: {"get": 1.0, "drop": 0.21}, 3: {"get": 0.19, "drop": 0.22}, 5: {"get": 1.0, "drop": 0.17}}
# chance to ask after a pair; tuned so the gaps between questions look like the released ones
_ASK_RATE = {2: 0.75, 3: 0.3, 5: 0.8}
# qa5 gives need two actors in one place: half of its moves go where someone else is
_QA5_MEET_RATE = 0.5
_QA5_QUESTION_WEIGHTS = {"what_did_give": 330, "who_gave": 178, "who_did_give_to": 171,
                         "who_gave_to": 168, "who_received": 153}   # test-set counts, evals.md §1.8
_QUESTIONS_PER_STORY = 5
_MAX_STATEMENTS = 228                          # the longest released qa3 story has 233 lines


class _TrueWorld:
    """Where everyone and everything really is; the rules hold by construction."""

    def __init__(self, actors, rng):
        self.actors = list(actors)
        self.actor_at = {a: rng.choice(LOCATIONS) for a in actors}
        self.object_at = {o: rng.choice(LOCATIONS) for o in OBJECTS}
        self.holder = {}

    def possible_actions(self, kinds):
        """kind -> list of (actor, argument) that the rules allow now."""
        options = {}
        if "move" in kinds:
            options["move"] = [(a, loc) for a in self.actors for loc in LOCATIONS if loc != self.actor_at[a]]
        if "get" in kinds:
            options["get"] = [(a, o) for a in self.actors for o in OBJECTS
                              if o not in self.holder and self.object_at[o] == self.actor_at[a]]
        if "drop" in kinds:
            options["drop"] = [(a, o) for o, a in self.holder.items()]
        if "give" in kinds:
            options["give"] = [(a, (o, b)) for o, a in self.holder.items() for b in self.actors
                               if b != a and self.actor_at[b] == self.actor_at[a]]
        return {k: v for k, v in options.items() if v}

    def do(self, kind, actor, argument):
        if kind == "move":
            self.actor_at[actor] = argument
            for obj, carrier in self.holder.items():
                if carrier == actor:
                    self.object_at[obj] = argument
        elif kind == "get":
            self.holder[argument] = actor
        elif kind == "drop":
            del self.holder[argument]
        else:
            obj, receiver = argument
            self.holder[obj] = receiver


def _statement_text(kind, actor, argument, task, rng) -> str:
    if kind == "move":
        return f"{actor} {rng.choice(MOVE_VERBS)} the {argument}."
    if kind in ("get", "drop"):
        verb = rng.choice(GET_VERBS if kind == "get" else DROP_VERBS)
        there = " there" if rng.random() < _THERE_RATE[task][kind] else ""
        return f"{actor} {verb} the {argument}{there}."
    obj, receiver = argument
    return f"{actor} {rng.choice(GIVE_VERBS)} the {obj} to {receiver}."


class _StoryWriter:
    """Numbers the lines and keeps the simulator in step with what has been written."""

    def __init__(self):
        self.lines: list[BabiLine] = []
        self.knowledge = BabiWorld()

    def state(self, text):
        line_id = len(self.lines) + 1
        self.knowledge.apply(text, line_id)
        self.lines.append(BabiLine(line_id, text))

    def ask(self, question) -> bool:
        answer, supports = self.knowledge.answer(question)
        if answer is None:
            return False
        self.lines.append(BabiLine(len(self.lines) + 1, question, answer, tuple(supports)))
        return True

    @property
    def n_questions(self):
        return sum(line.is_question for line in self.lines)


def _generate_qa1(rng) -> list[BabiLine]:
    # 5 x (2 moves + "Where is A?"), A an actor whose location has been stated (evals.md §1.8 qa1)
    world, writer, stated = _TrueWorld(ACTORS, rng), _StoryWriter(), []
    for _ in range(_QUESTIONS_PER_STORY):
        movers = []
        for _ in range(2):
            actor, location = rng.choice(world.possible_actions({"move"})["move"])
            world.do("move", actor, location)
            writer.state(_statement_text("move", actor, location, 1, rng))
            movers.append(actor)
            if actor not in stated:
                stated.append(actor)
        # three in four questions are about someone who just moved (75% in the released files)
        asked = rng.choice(movers) if rng.random() < 0.75 else rng.choice(stated)
        writer.ask(f"Where is {asked}?")
    return writer.lines


def _generate_qa4(rng) -> list[BabiLine]:
    # three places in a row on one axis; both statements involve the middle one (§1.8 qa4)
    towards_first, towards_last = rng.choice(AXES)
    first, middle, last = rng.sample(LOCATIONS, 3)
    relations = []   # (a, d, b): "The a is d of the b."
    for near, direction_from_middle in ((first, towards_first), (last, towards_last)):
        if rng.random() < 0.5:
            relations.append((near, direction_from_middle, middle))
        else:
            relations.append((middle, OPPOSITE[direction_from_middle], near))
    rng.shuffle(relations)
    writer = _StoryWriter()
    for a, d, b in relations:
        writer.state(f"The {a} is {d} of the {b}.")
    # a question read directly or inversely from one statement; about the middle place 2/3 of the time
    a, d, b = rng.choice(relations)
    forms = [(a, f"What is the {a} {d} of?"), (b, f"What is {d} of the {b}?"),
             (b, f"What is the {b} {OPPOSITE[d]} of?"), (a, f"What is {OPPOSITE[d]} of the {a}?")]
    about_middle = [q for x, q in forms if x == middle]
    about_end = [q for x, q in forms if x != middle]
    writer.ask(rng.choice(about_middle if rng.random() < 0.657 else about_end))
    return writer.lines


def _qa2_question(writer, rng):
    answerable = [o for o in OBJECTS if writer.knowledge.where_object(o)[0] is not None]
    return f"Where is the {rng.choice(answerable)}?" if answerable else None


def _qa3_question(writer, rng):
    # "Where was the O before the L?", L in O's history with a predecessor; the current place 80%
    candidates = [(o, trail) for o, trail in writer.knowledge.history.items() if len(trail) >= 2]
    if not candidates:
        return None
    obj, trail = rng.choice(candidates)
    earlier = sorted({arrival.location for arrival in trail[1:-1]} - {trail[-1].location})
    place = trail[-1].location if not earlier or rng.random() < 0.806 else rng.choice(earlier)
    return f"Where was the {obj} before the {place}?"


def _qa5_question(writer, rng):
    """A question about the latest give, if at most 5 statements followed it and none touched
    its object or repeated its giver->receiver pair (§1.8 qa5; the same give may be asked
    about again, as in the released files)."""
    gives = writer.knowledge.gives
    if not gives:
        return None
    giver, obj, receiver, give_line = gives[-1]
    after = [line.text for line in writer.lines if line.id > give_line and not line.is_question]
    if len(after) > 5:
        return None
    for text in after:
        kind, *args = parse_statement(text)
        if kind in ("get", "drop", "give") and args[1] == obj:
            return None
        if kind == "give" and (args[0], args[2]) == (giver, receiver):
            return None
    kind = rng.choices(list(_QA5_QUESTION_WEIGHTS), weights=list(_QA5_QUESTION_WEIGHTS.values()))[0]
    return {"what_did_give": f"What did {giver} give to {receiver}?",
            "who_gave": f"Who gave the {obj}?",
            "who_did_give_to": f"Who did {giver} give the {obj} to?",
            "who_gave_to": f"Who gave the {obj} to {receiver}?",
            "who_received": f"Who received the {obj}?"}[kind]


def _generate_with_actions(task, rng) -> list[BabiLine] | None:
    """qa2, qa3, qa5: statements in pairs; after a pair, maybe one answerable question."""
    world = _TrueWorld(ACTORS_QA5 if task == 5 else ACTORS, rng)
    writer = _StoryWriter()
    weights = _ACTION_WEIGHTS[task]
    while writer.n_questions < _QUESTIONS_PER_STORY:
        if len(writer.lines) >= _MAX_STATEMENTS:
            return None
        for _ in range(2):
            options = world.possible_actions(set(weights))
            kinds = list(options)
            kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
            choices = options[kind]
            if task == 5 and kind == "move" and rng.random() < _QA5_MEET_RATE:
                meetings = [(a, loc) for a, loc in choices
                            if any(world.actor_at[b] == loc for b in world.actors if b != a)]
                choices = meetings or choices
            actor, argument = rng.choice(choices)
            world.do(kind, actor, argument)
            writer.state(_statement_text(kind, actor, argument, task, rng))
        if rng.random() >= _ASK_RATE[task]:
            continue
        if task == 2:
            question = _qa2_question(writer, rng)
        elif task == 3:
            question = _qa3_question(writer, rng)
        else:
            question = _qa5_question(writer, rng)
        if question is not None:
            writer.ask(question)
    return writer.lines


def generate_story(task, rng: random.Random) -> list[BabiLine]:
    number = task_number(task)
    if number == 1:
        return _generate_qa1(rng)
    if number == 4:
        return _generate_qa4(rng)
    while True:                     # rare: no answerable question within the length cap, draw again
        story = _generate_with_actions(number, rng)
        if story is not None:
            return story


def generate_babi(task, n_stories: int, seed: int = 0, split: str = "train") -> list[list[BabiLine]]:
    """`n_stories` new stories of task qa1-qa5, the same for the same (task, seed, split).
    The two splits draw from disjoint random streams: no seed of one gives the stories of
    the other (an arithmetic offset such as test = train seed + 10**6 let a training seed
    reproduce a test set)."""
    if n_stories < 0:
        raise ValueError(f"n_stories must be >= 0, got {n_stories}")
    if split not in ("train", "test"):
        raise ValueError(f"bAbI split must be 'train' or 'test', got {split!r}")
    number = task_number(task)
    # "train" keeps the original stream name, so training stories are those of earlier runs
    rng = random.Random(f"babi-qa{number}-seed{seed}" if split == "train" else f"babi-qa{number}-test-seed{seed}")
    return [generate_story(number, rng) for _ in range(n_stories)]


if __name__ == "__main__":          # a library: say so rather than exit 0 having done nothing
    print("error: eval.babi has no command line; BABILong's samples come from "
          "python -m eval.babilong build (docs/BABILONG.md)", file=sys.stderr)
    sys.exit(2)
