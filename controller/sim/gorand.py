"""Go's ``math/rand`` (v1) in Python, draw for draw, so FGD's pod orders can be rebuilt.

FGD's simulator (``hkust-adsl/kubernetes-scheduler-simulator``, written in Go) seeds the
global ``math/rand`` source and shuffles and resamples the pod list with it; the same seed
must give the same pods in the same order here, or "ours vs FGD per seed" compares
different workloads. This is a port of Go's additive lagged Fibonacci source
(``rngSource``: 607 words, tap 273, seeded through ``seedrand`` and the cooked table in
``_gorand_cooked``) and of the ``Rand`` methods FGD's generator calls: ``Int``, ``Intn``
(``Int31n``/``Int63n``) and ``Shuffle`` (Lemire's ``int31n``). ``tests/unit`` checks it
against sequences printed by Go itself.
"""

from __future__ import annotations

from collections.abc import Callable

from aifactory.controller.sim._gorand_cooked import RNG_COOKED

__all__ = ["GoRand"]

_LEN = 607
_TAP = 273
_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1


def _seedrand(x: int) -> int:
    """Go's ``seedrand``: x[n+1] = 48271 * x[n] mod (2**31 - 1), for 0 < x < 2**31 - 1."""
    hi, lo = divmod(x, 44488)
    x = 48271 * lo - 3399 * hi
    return x + _INT32_MAX if x < 0 else x


class GoRand:
    """``rand.New(rand.NewSource(seed))`` of Go, or the global source after
    ``rand.Seed(seed)``: the same numbers in the same order."""

    __slots__ = ("_feed", "_tap", "_vec")

    def __init__(self, seed: int) -> None:
        self._tap = 0
        self._feed = _LEN - _TAP
        seed %= _INT32_MAX  # Python's % is already non-negative, as Go's code makes it
        if seed == 0:
            seed = 89482311
        x = seed
        vec = [0] * _LEN
        for i in range(-20, _LEN):
            x = _seedrand(x)
            if i >= 0:
                u = x << 40
                x = _seedrand(x)
                u ^= x << 20
                x = _seedrand(x)
                u ^= x
                vec[i] = (u ^ RNG_COOKED[i]) & _MASK64
        self._vec = vec

    def uint64(self) -> int:
        self._tap -= 1
        if self._tap < 0:
            self._tap += _LEN
        self._feed -= 1
        if self._feed < 0:
            self._feed += _LEN
        x = (self._vec[self._feed] + self._vec[self._tap]) & _MASK64
        self._vec[self._feed] = x
        return x

    def int63(self) -> int:
        return self.uint64() & _MASK63

    def uint32(self) -> int:
        return self.int63() >> 31

    def int31(self) -> int:
        return self.int63() >> 32

    def int_(self) -> int:
        """Go's ``Int()`` on a 64-bit platform, one ``Int63`` (named ``int_`` as ``int`` is
        the builtin type)."""
        return self.int63()

    def int63n(self, n: int) -> int:
        if n <= 0:
            raise ValueError("invalid argument to Int63n")
        if n & (n - 1) == 0:
            return self.int63() & (n - 1)
        top = (1 << 63) - 1 - (1 << 63) % n
        v = self.int63()
        while v > top:
            v = self.int63()
        return v % n

    def int31n(self, n: int) -> int:
        if n <= 0:
            raise ValueError("invalid argument to Int31n")
        if n & (n - 1) == 0:
            return self.int31() & (n - 1)
        top = (1 << 31) - 1 - (1 << 31) % n
        v = self.int31()
        while v > top:
            v = self.int31()
        return v % n

    def intn(self, n: int) -> int:
        if n <= 0:
            raise ValueError("invalid argument to Intn")
        return self.int31n(n) if n <= _INT32_MAX else self.int63n(n)

    def _int31n_lemire(self, n: int) -> int:
        """Go's unexported ``int31n`` (Lemire's multiply-shift), used by ``Shuffle``."""
        prod = self.uint32() * n
        low = prod & 0xFFFFFFFF
        if low < n:
            thresh = ((1 << 32) - n) % n
            while low < thresh:
                prod = self.uint32() * n
                low = prod & 0xFFFFFFFF
        return prod >> 32

    def shuffle(self, n: int, swap: Callable[[int, int], None]) -> None:
        if n < 0:
            raise ValueError("invalid argument to Shuffle")
        i = n - 1
        while i > (1 << 31) - 2:
            swap(i, self.int63n(i + 1))
            i -= 1
        while i > 0:
            swap(i, self._int31n_lemire(i + 1))
            i -= 1
