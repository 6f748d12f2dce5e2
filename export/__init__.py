"""ONNX export and Triton model-repository building for scGPT models (installed as `scgpt_hf.export`)."""
