"""Class names: the default list and the parsing of --classes.

The names are CIFAR-10's own label names (its ``batches.meta``), matched by name, never by index:
a model's label i is the i-th name of *its* class list, which the checkpoint stores and every later
stage reads from there.
"""

from __future__ import annotations

# CIFAR-10's label names, to validate --classes before any data is read.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_CLASSES: tuple[str, ...] = ("airplane", "automobile", "ship")


def parse_classes(text: str) -> list[str]:
    """'airplane,automobile,ship' -> ['airplane', 'automobile', 'ship'], validated."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CIFAR10_CLASSES]
    if unknown:
        raise ValueError(f"unknown class name(s): {', '.join(unknown)}; CIFAR-10 has {', '.join(CIFAR10_CLASSES)}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"need at least two distinct class names, got {text!r}")
    return names
