"""The demo library: the standard sequence learned on the embedded world, with its forgetting record, shipped so
that a first visit has concepts to compose and a forgetting grid to look at within seconds.

`python -m cidm demo --out examples/demo-library` builds it through the user's path (`Studio.learn`, the base's
defaults, no captions); the app copies it into a visitor's own library when they choose to start from it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .bench.results import EXAMPLES, load_concept_set
from .library import Library, LibraryError
from .studio import Studio

DEMO_LIBRARY = EXAMPLES.parent / "demo-library"


def build_demo_library(out, base_model: str | None = None, concepts: Path = EXAMPLES, seed: int = 0,
                       report: Callable[[str], None] = print) -> Path:
    """Learn the concept set's standard sequence one task after another into the empty library `out`."""
    spec = load_concept_set(concepts)
    studio = Studio(out, base_model=base_model)
    if studio.names:
        raise ValueError(f"{out} already holds concepts ({', '.join(studio.names)}); give an empty folder")
    for name in spec["standard_sequence"]:
        c = spec["concepts"][name]
        t0 = time.perf_counter()
        studio.learn(name, c["reference_images"], c["class_word"], c["kind"], seed=seed)
        report(f"learned <{name}> ({c['kind']}) in {time.perf_counter() - t0:.1f} s, forgetting record included")
    return Path(out)


def demo_fits(source: str, n_layers: int, demo=DEMO_LIBRARY) -> bool:
    """Whether a demo library is shipped and was learned on this base model (the embedded world's, for the one
    shipped): a Space on Stable Diffusion does not offer concepts its base cannot use."""
    if not (Path(demo) / "library.json").is_file():
        return False
    try:
        Library(demo, read_only=True).check_base(source, n_layers)
    except LibraryError:
        return False
    return True


def start_from_demo(dest, demo=DEMO_LIBRARY) -> list[str]:
    """Copy the demo library into the empty library `dest` (the visitor's own copy: the shipped one is never
    written) and return its concepts."""
    demo = Path(demo)
    if not (demo / "library.json").is_file():
        raise LibraryError("no demo library is shipped with this installation; learn a concept to start")
    target = Library(dest)
    if target.names:
        raise LibraryError(f"your library already holds {len(target)} concepts; the demo library only starts an "
                           f"empty one (delete them, or keep working with yours)")
    with target.staging() as stage:
        Library(demo, read_only=True).snapshot(stage / "demo", link=False)
        target.move_in(stage / "demo")
    return target.names
