"""The methods the web page runs, from what its form says: the chosen names, a budget or MustDrop's thresholds.

The page's form maps onto the CLIs' flags: a budget is `--budget` for every chosen method (PruMerge+, which
picks its own count and refuses a budget, runs without it), a kept share `--keep`; without either MustDrop
runs at its two thresholds
(`--sparse --global_thr G --individual_thr I`) and every other method at its defaults. The unpruned model
always runs first, as the reference each method is compared with.
"""

from __future__ import annotations

from llava.drop.methods import METHODS, DropMethod, create_method
from llava.drop.methods.registry import discover_methods
from llava.eval.thresholds import REFERENCE_BENCHMARK, thresholds_for

UNPRUNED = "none"
MUSTDROP = "mustdrop"
PAGE_THRESHOLDS = thresholds_for(REFERENCE_BENCHMARK, 64)  # the page's starting pair: TextVQA at 64 tokens


def choosable_methods() -> list[str]:
    """Every registered method but the unpruned model (which always runs), MustDrop first."""
    discover_methods()
    return sorted((name for name in METHODS if name != UNPRUNED), key=lambda name: (name != MUSTDROP, name))


def takes_budget(name: str) -> bool:
    """Whether a page budget applies to method `name` (the unpruned model and PruMerge+ keep their own counts)."""
    discover_methods()
    return name != UNPRUNED and not getattr(METHODS.get(name), "own_count", False)


def page_method(name: str, budget: float | None, global_thr: float, individual_thr: float,
                keep: float | None = None) -> DropMethod:
    """Method `name` as the matching CLI flags would build it (`--budget`, `--keep`, or MustDrop's thresholds);
    a ValueError names what is wrong."""
    options = {}
    if budget is not None and takes_budget(name):
        options["budget"] = str(budget)
    elif keep is not None and takes_budget(name):
        options["keep_fraction"] = str(keep)
    elif name == MUSTDROP:
        options.update(global_thr=str(global_thr), individual_thr=str(individual_thr))
    return create_method(name, options)


def page_methods(names: list[str], budget: float | None, global_thr: float, individual_thr: float,
                 keep: float | None = None) -> list[DropMethod]:
    """The unpruned model, then each chosen method in the page's order (a name chosen twice runs once)."""
    if budget is not None and keep is not None:
        raise ValueError("a budget and a kept share both set how many vision tokens to keep; give one")
    chosen = [UNPRUNED] + [name for name in dict.fromkeys(names) if name != UNPRUNED]
    return [page_method(name, budget, global_thr, individual_thr, keep) for name in chosen]


def setting_label(method: DropMethod) -> str:
    """How much method `method` was asked to keep, in the page's words."""
    options = getattr(method, "options", None)
    if method.name == UNPRUNED:
        return "unpruned: every vision token"
    if getattr(options, "budget", None) is not None:
        return f"budget {options.budget:g} vision tokens per layer"
    if getattr(options, "keep_fraction", None) is not None:
        return f"keep {options.keep_fraction:g} of the image's vision tokens"
    if method.name == MUSTDROP:
        return f"thresholds: global {options.global_thr:g}, individual {options.individual_thr:g}"
    if method.own_count:
        return "its own token count (it takes no budget)"
    return "its default settings"
