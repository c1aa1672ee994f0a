"""cifar3 training side: data, model, preprocessing, checkpoints, train and evaluate CLIs.

Kept import-free: the handler imports ``training.model``, ``training.preprocessing`` and
``training.checkpoint`` from inside the .mar, where only torch, torchvision and Pillow exist.
"""
