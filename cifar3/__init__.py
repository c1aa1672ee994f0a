"""The serving core of cifar3: classes, model definition, preprocessing, checkpoint format and inference.

Training, evaluation, the TorchServe handler and the benchmark all import these modules; the .mar
carries this package, so it depends on torch, torchvision and Pillow only (ONNX Runtime and captum
where an engine or explanations need them). Kept import-free so that importing one module loads only
what that module needs.
"""
