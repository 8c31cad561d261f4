"""An inference server with a small real model: a character trigram language model.

It is fitted at start on ``corpus.txt`` (a few paragraphs shipped in the package), so it
needs neither torch nor a download, and it generates text one character at a time: the next
character is drawn from what followed the last two characters in the corpus, backing off to
the last one, then to single-character frequencies, for contexts never seen.

``POST`` a JSON body ``{"prompt": "The factory", "max_tokens": 64, "temperature": 1.0,
"seed": 7}`` (all optional) and get ``{"model": "char-trigram", "text": "...", "tokens": 64}``;
the same request always gets the same text (the seed defaults to one derived from the
prompt). Run as a command (``python -m aifactory_examples.serve``; ``$HOST:$PORT`` as the
worker sets them) it reports its requests in flight; ``factory`` is the entrypoint form.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import sys
import zlib
from collections import Counter
from importlib import resources
from typing import Any

from aifactory_examples.serving import Handler, run_server, server_args

__all__ = ["MAX_TOKENS", "TrigramModel", "factory", "handler", "main"]

MODEL_NAME = "char-trigram"
MAX_TOKENS = 4096
MAX_TEMPERATURE = 5.0


def default_corpus() -> str:
    return resources.files("aifactory_examples").joinpath("corpus.txt").read_text("utf-8")


class _Next:
    """The characters seen after one context, with cumulative counts for sampling."""

    __slots__ = ("chars", "counts", "cumulative")

    def __init__(self, counts: Counter[str]) -> None:
        self.chars = sorted(counts)
        self.counts = [counts[c] for c in self.chars]
        self.cumulative = list(itertools.accumulate(self.counts))

    def draw(self, rng: random.Random, temperature: float) -> str:
        if temperature == 1.0:
            point = rng.random() * self.cumulative[-1]
            return self.chars[bisect.bisect_right(self.cumulative, point)]
        weights = [c ** (1.0 / temperature) for c in self.counts]
        return rng.choices(self.chars, weights=weights)[0]


class TrigramModel:
    """Next-character statistics of a text for contexts of two, one and zero characters."""

    def __init__(self, text: str) -> None:
        text = " ".join(text.split())  # one space for every run of whitespace
        if len(text) < 3:
            raise ValueError("corpus: needs at least 3 characters of text")
        counts: dict[str, Counter[str]] = {}
        for order in (0, 1, 2):
            for i in range(order, len(text)):
                counts.setdefault(text[i - order:i], Counter())[text[i]] += 1
        self.next = {context: _Next(c) for context, c in counts.items()}
        self.text = text

    def generate(self, prompt: str, max_tokens: int, temperature: float = 1.0,
                 seed: int | None = None) -> str:
        rng = random.Random(zlib.crc32(prompt.encode()) if seed is None else seed)
        context = " ".join(prompt.split()) if prompt.strip() else " "
        out: list[str] = []
        for _ in range(max_tokens):
            key = context[-2:]
            table = self.next.get(key) or self.next.get(key[-1:]) or self.next[""]
            char = table.draw(rng, temperature)
            out.append(char)
            context = key + char
        return "".join(out)


def _field(request: dict[str, Any], name: str, default: float | None, low: float,
           high: float, *, integer: bool) -> Any:
    """``request[name]`` checked to be a number (an integer) from ``low`` to ``high``."""
    value: Any = request.get(name, default)
    if value is None and default is None:
        return None
    valid = isinstance(value, int) or (not integer and isinstance(value, float))
    if isinstance(value, bool) or not valid or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}: expected {kind} from {low:g} to {high:g}, got {value!r}")
    return int(value) if integer else float(value)


def handler(model: TrigramModel) -> Handler:
    """The request handler over ``model``: JSON in, JSON out (``ValueError`` on bad input)."""

    def handle(body: bytes) -> bytes:
        try:
            request = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            raise ValueError(f"body: expected a JSON object, got invalid JSON ({exc})") from None
        if not isinstance(request, dict):
            raise ValueError(f"body: expected a JSON object, got {type(request).__name__}")
        prompt = request.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
        max_tokens = _field(request, "max_tokens", 64, 1, MAX_TOKENS, integer=True)
        temperature = _field(request, "temperature", 1.0, 0.05, MAX_TEMPERATURE, integer=False)
        seed = _field(request, "seed", None, 0, 2**63, integer=True)
        text = model.generate(prompt, max_tokens, temperature, seed)
        return json.dumps({"model": MODEL_NAME, "text": text, "tokens": len(text)}).encode()

    return handle


def factory(ctx: Any) -> Handler:
    """Entrypoint form (``aifactory_examples.serve:factory``): the worker serves and counts."""
    return handler(TrigramModel(default_corpus()))


def main(argv: list[str] | None = None) -> int:
    args = server_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    return run_server(handler(TrigramModel(default_corpus())), args, MODEL_NAME)


if __name__ == "__main__":
    sys.exit(main())
