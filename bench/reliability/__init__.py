"""Reliability and security of the cifar3 TorchServe under faults and load: ``python -m bench.reliability``
(see __main__.py). Each check is a function returning result rows; tests/test_reliability.py asserts on them."""
