"""The transcript format of an assistant turn that searches and quotes (fixed; documented in README).

A reply that uses evidence is one assistant turn of three kinds of lines:

    Search Query: capital of Veltra
    Search Result: Veltra | Veltra is a river nation. Its capital is Osk.
    Osk is the capital of Veltra. Source: Veltra "Its capital is Osk."

- `Search Query: <query>` is written by the policy (anywhere in a line: text before it is answer);
  the line's newline ends the tool call.
- `Search Result: <title> | <passage>` lines are inserted by the system (the search tool),
  one per retrieved passage; the policy never generates them (their tokens are masked out of
  the policy loss).
- The answer follows. It may end with one citation, `Source: <title> "<verbatim quote>"`,
  where the quote is copied from a passage of that title shown in a Search Result line.

A reply without search is just the answer (it may not cite anything: there is no evidence).
`parse` reads any text (a policy's output can be malformed) and never raises.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

QUERY = "Search Query:"
RESULT = "Search Result:"
SOURCE = "Source:"
TITLE_SEP = " | "
# `Source: <title> "<quote>"` at the end of the answer (title: anything but a quote mark).
_CITATION = re.compile(r'Source:\s*(?P<title>[^"\n]*?)\s*"(?P<quote>[^"\n]*)"\s*\.?\s*$')


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    doc: int = -1  # index of the corpus document it came from (-1: unknown)


@dataclass
class Transcript:
    queries: list[str] = field(default_factory=list)              # in order
    results: list[list[Passage]] = field(default_factory=list)    # per query, the inserted passages
    stray_results: int = 0        # Search Result lines with no query before them (written by the policy)
    answer: str = ""              # the answer text, citation removed, stripped
    cited_title: str | None = None
    quote: str | None = None      # None: no citation; "" an empty one

    @property
    def searched(self) -> bool:
        return bool(self.queries)

    @property
    def retrieved(self) -> list[Passage]:
        return [p for group in self.results for p in group]


def normalize(text: str) -> str:
    """Whitespace collapsed to single spaces, stripped (quotes are compared this way)."""
    return " ".join(text.split())


def query_line(query: str) -> str:
    return f"{QUERY} {normalize(query)}\n"


def result_lines(passages: list[Passage]) -> str:
    """What the search tool inserts: one `Search Result: title | passage` line per passage."""
    return "".join(f"{RESULT} {normalize(p.title)}{TITLE_SEP}{normalize(p.text)}\n" for p in passages)


def citation(title: str, quote: str) -> str:
    return f'{SOURCE} {normalize(title)} "{normalize(quote)}"'


def render(answer: str, query: str | None = None, passages: list[Passage] = (), cite: tuple[str, str] | None = None) -> str:
    """A whole assistant turn: optional search (query + inserted results), the answer, an optional citation."""
    head = query_line(query) + result_lines(list(passages)) if query is not None else ""
    tail = f" {citation(*cite)}" if cite is not None else ""
    return f"{head}{answer.strip()}{tail}"


def parse(reply: str) -> Transcript:
    """Splits a reply into search turns, answer and citation (see the module docstring)."""
    out = Transcript()
    answer_lines: list[str] = []
    for raw in reply.split("\n"):
        line = raw.strip()
        before, sep, after = line.partition(QUERY)
        if sep and before:  # "Let me check. Search Query: x": the tool runs on a query anywhere in a line
            answer_lines.append(before.strip())
            line = sep + after
        if line.startswith(QUERY):
            out.queries.append(normalize(line[len(QUERY):]))
            out.results.append([])
        elif line.startswith(RESULT):
            body = line[len(RESULT):].strip()
            title, sep, text = body.partition(TITLE_SEP.strip())
            passage = Passage(normalize(title), normalize(text)) if sep else Passage("", normalize(body))
            if out.results:
                out.results[-1].append(passage)
            else:
                out.stray_results += 1
        elif line:
            answer_lines.append(line)
    answer = " ".join(answer_lines)
    match = _CITATION.search(answer)
    if match:
        out.cited_title, out.quote = normalize(match["title"]), normalize(match["quote"])
        answer = answer[:match.start()]
    out.answer = normalize(answer)
    return out
