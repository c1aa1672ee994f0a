"""Class names: CIFAR-10's, the default list for a CIFAR source, and the parsing of --classes.

Classes are matched by name, never by index: a CIFAR source's by its own label names (its ``batches.meta``),
an image folder's by its sub-folder names. A model's label i is the i-th name of *its* class list, which the
checkpoint stores and every later stage reads from there.
"""

from __future__ import annotations

# CIFAR-10's label names, to validate --classes of a CIFAR source before any data is read.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_CLASSES: tuple[str, ...] = ("airplane", "automobile", "ship")  # a CIFAR source's classes without --classes


def parse_classes(text: str, known: tuple[str, ...] | None = None, source: str = "CIFAR-10") -> list[str]:
    """'airplane,automobile,ship' -> ['airplane', 'automobile', 'ship']: at least two distinct names, each one of
    ``known`` (the names ``source`` has) when given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if known is not None:
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"unknown class name(s): {', '.join(unknown)}; {source} has {', '.join(known)}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"need at least two distinct class names, got {text!r}")
    return names
