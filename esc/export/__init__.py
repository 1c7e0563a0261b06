"""ONNX QDQ export of calibrated models and their integer execution with onnxruntime (see :mod:`esc.export.onnx`)."""
