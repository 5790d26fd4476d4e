"""Every prompt template in one place, by the concept's kind (object | style): training captions, the probe prompt a
concept is re-generated with (after each task, and by LwF's and LFS's teachers), the model card's example, and the
benchmarks' prompts.
"""

from __future__ import annotations

OBJECT_TEMPLATES = ("a photo of a {}", "a close-up photo of a {}", "a picture of a {}", "a photo of the {}")
STYLE_TEMPLATES = ("a picture in {} style", "a photo in {} style", "a painting in {} style", "an image in {} style")
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}  # the paper's (objects / styles)
KINDS = tuple(TEMPLATES)


def check_kind(kind: str) -> str:
    if kind not in TEMPLATES:
        raise ValueError(f"kind must be 'object' or 'style', got {kind!r}")
    return kind


def training_captions(name: str, kind: str, n_images: int) -> list[str]:
    """One caption per image when the user gives none: the kind's templates in turn, with `<name>`."""
    templates = TEMPLATES[check_kind(kind)]
    return [templates[i % len(templates)].format(f"<{name}>") for i in range(n_images)]


def probe_prompt(name: str, kind: str) -> str:
    """The fixed prompt that stands for a learned concept: its kind's first training template."""
    return TEMPLATES[check_kind(kind)][0].format(f"<{name}>")


def card_prompt(name: str, kind: str) -> str:
    """The example prompt of a concept's model card."""
    return f"a photo of a <{name}> on a beach" if check_kind(kind) == "object" else probe_prompt(name, kind)


def class_prompt(class_word: str, kind: str) -> str:
    """A prompt of what a concept is (its class), without the concept: LFS's "relevant concepts"."""
    return OBJECT_TEMPLATES[0].format(class_word) if check_kind(kind) == "object" else "a picture"


def region_prompt(name: str) -> str:
    """What goes in a box (compose benchmark) and the prompt EWA routing is measured with: an object's probe."""
    return probe_prompt(name, "object")


def scene_prompt(scene: str) -> str:
    """A global prompt without any concept, e.g. 'a photo on a beach'."""
    return f"a photo {scene}"


def together_prompt(names: list[str], scene: str) -> str:
    """One global prompt naming several object concepts, e.g. 'a photo of a <a> and a <b> on grass'."""
    return "a photo of " + " and ".join(f"a <{n}>" for n in names) + f" {scene}"
