"""Key prefixes before a format's own rules: wrapper levels (DDP, torch.compile, Lightning), --strip, --keep.

`zoo.convert` runs these on the file's state dict, in this order, before `map_keys` applies the format's
keep / drop rules:

1. wrappers: a level named `module.` (DDP / DataParallel), `_orig_mod.` (torch.compile) or `model.` (a
   LightningModule holding `self.model`) is removed where it is the *only* child of its parent, in any
   nesting (`module._orig_mod.`, `backbone._orig_mod.`, `model.module.`). A wrapper module has exactly one
   child, so this never touches a real part of a method; a format whose own layout names a part `model`
   (W-MSE) leaves `model.` out of its row's `wrappers`.
2. `--strip P`: P is removed from the keys that start with it.
3. `--keep P`: only the keys under P are kept, and P becomes the format's backbone prefix (`Format.backbone`),
   so the format's rules map it as they map the encoder they keep by default (for timm / torchvision,
   whose backbone prefix is empty, that is stripping P).
4. a row's `fallbacks`: a layout naming the encoder differently (solo-learn <= 1.0.4 `encoder`, lightly's
   DINO example `teacher_backbone`) is read as the default layout when the default backbone prefix is absent.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from zoo.convert_formats import ConversionError, Format


@dataclass
class Prefixed:
    """The state dict after the prefix steps, and what each step did (for the report)."""

    state: dict[str, torch.Tensor]
    stripped: Counter = field(default_factory=Counter)  # prefix -> keys it was removed from
    outside_keep: int = 0  # keys dropped because they are not under --keep
    encoder: str | None = None  # which encoder was chosen by --keep or a fallback, and why


def strip_wrappers(state: dict[str, torch.Tensor], wrappers: Sequence[str]) -> tuple[dict[str, torch.Tensor], Counter]:
    """Remove wrapper levels that are the only child of their parent (see the module docstring)."""
    names = {w.rstrip(".") for w in wrappers}
    keys = {k: k.split(".") for k in state}
    stripped: Counter = Counter()
    while True:
        children: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for parts in keys.values():
            for i in range(len(parts)):
                children[tuple(parts[:i])].add(parts[i])
        found = None
        for parent, kids in children.items():
            if len(kids) == 1 and (only := next(iter(kids))) in names:
                level = (*parent, only)
                under = [parts for parts in keys.values() if tuple(parts[:len(level)]) == level]
                if all(len(parts) > len(level) for parts in under):  # a module level, not a tensor's own name
                    found = level
                    break
        if found is None:
            break
        n = len(found)
        for k, parts in keys.items():
            if tuple(parts[:n]) == found:
                keys[k] = parts[:n - 1] + parts[n:]
                stripped[".".join(found) + "."] += 1
    return {".".join(keys[k]): v for k, v in state.items()}, stripped


def apply_prefixes(state: dict[str, torch.Tensor], fmt: Format, strip: Sequence[str] = (),
                   keep: str | None = None) -> Prefixed:
    """Steps 1-4 of the module docstring."""
    state, stripped = strip_wrappers(state, fmt.wrappers)
    result = Prefixed(state, stripped)
    for prefix in strip:
        hits = [k for k in result.state if k.startswith(prefix)]
        if not hits:
            raise ConversionError(f"no key starts with {prefix!r} (keys start with {_heads(result.state)}); "
                                  f"fix --strip {prefix}")
        result.state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in result.state.items()}
        result.stripped[f"--strip {prefix}"] += len(hits)
    chosen, why = keep, f"`{keep}` (--keep)"
    if keep is None and fmt.backbone and not any(k.startswith(fmt.backbone) for k in result.state):
        for prefix, reason in fmt.fallbacks:
            if any(k.startswith(prefix) for k in result.state):
                chosen, why = prefix, f"`{prefix}`: {reason}"
                break
        else:
            chosen = None
    if chosen is None:
        return result
    under = {k: v for k, v in result.state.items() if k.startswith(chosen)}
    if not under:
        raise ConversionError(f"no key starts with {chosen!r} (keys start with {_heads(result.state)}); "
                              f"fix --keep {chosen}")
    renamed = {fmt.backbone + k[len(chosen):]: v for k, v in under.items()}
    if keep is not None:  # --keep: everything else goes
        result.outside_keep = len(result.state) - len(under)
        result.state = renamed
    else:  # a fallback layout: the rest still goes through the format's drop rules (nothing unseen is dropped)
        result.state = {**{k: v for k, v in result.state.items() if not k.startswith(chosen)}, **renamed}
    result.encoder = why
    return result


def _heads(state: dict[str, torch.Tensor], n: int = 6) -> str:
    heads = Counter(k.split(".")[0] + "." for k in state)
    return ", ".join(f"{h} ({c})" for h, c in heads.most_common(n))


def prefix_hint(unknown: Sequence[str], converts: Callable[[Sequence[str], str | None], bool]) -> str | None:
    """The --strip / --keep that makes the conversion account for every key, if one does.

    `converts(strip, keep)` says whether the conversion would then succeed; candidates are the unknown
    keys' most common prefixes of 1-3 levels.
    """
    candidates: Counter = Counter()
    for key in unknown:
        parts = key.split(".")
        for i in range(1, min(len(parts), 4)):
            candidates[".".join(parts[:i]) + "."] += 1
    for prefix, _ in candidates.most_common(8):
        works = [flag for flag, args in (("--strip", ((prefix,), None)), ("--keep", ((), prefix))) if converts(*args)]
        if works:
            return f"keys start with `{prefix}`: pass " + " or ".join(f"{f} {prefix}" for f in works)
    return None
