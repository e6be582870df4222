"""MustDrop's published thresholds: the reference code's settings for LLaVA-1.5-7B, written here once.

    python -m llava.eval.thresholds textvqa 64        # prints "0.011 0.01" (global individual)

The authors published TextVQA's 192 / 128 / 64 "tokens" (vision tokens per decoder layer, averaged)
and VizWiz's 64. Every other benchmark, and VizWiz at 192 / 128, reuses TextVQA's pair, as the
benchmark scripts do; `python -m llava.eval.calibrate` finds pairs for another model or benchmark.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from llava.eval.cli_errors import interruptible

REFERENCE_BENCHMARK = "textvqa"


@dataclass(frozen=True)
class Thresholds:
    global_thr: float
    individual_thr: float

    def __str__(self) -> str:
        """The "global individual" form that the scripts' THR_192 / THR_128 / THR_64 take."""
        return f"{self.global_thr:g} {self.individual_thr:g}"


PUBLISHED: dict[str, dict[int, Thresholds]] = {  # benchmark -> target tokens -> pair
    REFERENCE_BENCHMARK: {
        192: Thresholds(0.001, 0.001),
        128: Thresholds(0.0012, 0.001),
        64: Thresholds(0.011, 0.01),
    },
    "vizwiz": {64: Thresholds(0.005, 0.001)},
}
TOKEN_SETTINGS = tuple(PUBLISHED[REFERENCE_BENCHMARK])  # 192, 128, 64


def thresholds_for(benchmark: str, tokens: int) -> Thresholds:
    """The pair published for `benchmark` at `tokens`, else TextVQA's (what the scripts reuse)."""
    if tokens not in TOKEN_SETTINGS:
        settings = ", ".join(map(str, TOKEN_SETTINGS))
        raise ValueError(f"no published thresholds for {tokens} tokens; settings: {settings}")
    return PUBLISHED.get(benchmark.lower(), {}).get(tokens, PUBLISHED[REFERENCE_BENCHMARK][tokens])


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", help="e.g. textvqa, vizwiz, gqa (without published thresholds: TextVQA's)")
    parser.add_argument("tokens", type=int, choices=TOKEN_SETTINGS)
    args = parser.parse_args(argv)
    print(thresholds_for(args.benchmark, args.tokens))


if __name__ == "__main__":
    main()
