"""Which packages install: only the project's own import namespace (everything else is in pyproject.toml).

    cifar3           the serving core (cifar3/)
    cifar3_client    the HTTP client and the server lifecycle (cifar3_client/)
    cifar3_training  the folder training/ under the project's name: a top-level ``training`` would collide with
                     other projects'. From the repository root the folder stays ``training`` (python -m
                     training.train); its modules import each other relatively, so they work under both names.

scripts/, ui/, bench/ and handler/ are not installed: they run from the repository (handler/ inside the .mar).
Only the folders present are listed, because the Docker images copy a subset of them and setuptools refuses a
listed package without its folder (pyproject.toml's own package list cannot leave one out).
"""

from pathlib import Path

from setuptools import setup

FOLDERS = {"cifar3": "cifar3", "cifar3_client": "cifar3_client", "cifar3_training": "training"}  # package: folder
present = {package: folder for package, folder in FOLDERS.items() if Path(folder, "__init__.py").is_file()}
setup(packages=list(present), package_dir=present)
