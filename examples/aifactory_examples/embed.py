"""An embedding server with a small real model: hashed character n-grams through a fixed
random projection.

Each text becomes counts of its character 3-, 4- and 5-grams (lower-cased, padded with a
space), hashed into ``BUCKETS`` buckets with a hash-derived sign, log-scaled, multiplied by a
``BUCKETS x DIMENSIONS`` Gaussian matrix drawn from a fixed seed, and L2-normalised. Texts
that share many n-grams get a high cosine similarity, the same text always gets the same
vector, and nothing is downloaded (numpy only, no torch).

``POST`` ``{"input": "text"}`` or ``{"input": ["a", "b"]}`` and get ``{"model":
"hashed-ngram-256", "dimensions": 256, "data": [{"index": 0, "embedding": [...]}]}``. Run as a
command (``python -m aifactory_examples.embed``; ``$HOST:$PORT`` as the worker sets them) it
reports its requests in flight; ``factory`` is the entrypoint form.
"""

from __future__ import annotations

import json
import sys
import zlib
from typing import Any

import numpy as np

from aifactory_examples.serving import Handler, run_server, server_args

__all__ = ["DIMENSIONS", "HashedNgramEmbedder", "factory", "handler", "main"]

DIMENSIONS = 256
BUCKETS = 4096
NGRAMS = (3, 4, 5)
MAX_INPUTS = 256
MAX_CHARS = 100_000
MODEL_NAME = f"hashed-ngram-{DIMENSIONS}"


class HashedNgramEmbedder:
    """Text to a unit vector of ``dimensions`` floats (deterministic for a given seed)."""

    def __init__(self, dimensions: int = DIMENSIONS, buckets: int = BUCKETS, seed: int = 0
                 ) -> None:
        rng = np.random.default_rng(seed)
        self.buckets = buckets
        self.dimensions = dimensions
        self.projection = (rng.standard_normal((buckets, dimensions)) /
                           np.sqrt(dimensions)).astype(np.float32)

    def features(self, text: str) -> Any:
        padded = f" {' '.join(text.lower().split())} "
        counts = np.zeros(self.buckets, dtype=np.float32)
        for n in NGRAMS:
            for i in range(len(padded) - n + 1):
                h = zlib.crc32(padded[i:i + n].encode())
                counts[h % self.buckets] += 1.0 if h & 0x80000000 else -1.0
        return np.sign(counts) * np.log1p(np.abs(counts))

    def embed(self, texts: list[str]) -> Any:
        """One row per text, each of norm 1 (all zeros for a text without any n-gram)."""
        rows = np.stack([self.features(t) for t in texts]) @ self.projection
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)


def handler(model: HashedNgramEmbedder) -> Handler:
    """The request handler over ``model``: JSON in, JSON out (``ValueError`` on bad input)."""

    def handle(body: bytes) -> bytes:
        try:
            request = json.loads(body)
        except ValueError as exc:
            raise ValueError(f"body: expected a JSON object, got invalid JSON ({exc})") from None
        if not isinstance(request, dict) or "input" not in request:
            raise ValueError('body: expected {"input": "text"} or {"input": ["text", ...]}')
        given = request["input"]
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or len(texts) > MAX_INPUTS or \
                not all(isinstance(t, str) and len(t) <= MAX_CHARS for t in texts):
            raise ValueError(f"input: expected a string or a list of 1 to {MAX_INPUTS} "
                             f"strings of at most {MAX_CHARS} characters")
        vectors = model.embed(texts)
        return json.dumps({
            "model": MODEL_NAME, "dimensions": model.dimensions,
            "data": [{"index": i, "embedding": [round(float(v), 6) for v in row]}
                     for i, row in enumerate(vectors)]}).encode()

    return handle


def factory(ctx: Any) -> Handler:
    """Entrypoint form (``aifactory_examples.embed:factory``): the worker serves and counts."""
    return handler(HashedNgramEmbedder())


def main(argv: list[str] | None = None) -> int:
    args = server_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    return run_server(handler(HashedNgramEmbedder()), args, MODEL_NAME)


if __name__ == "__main__":
    sys.exit(main())
