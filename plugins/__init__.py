"""vsopt.plugins: deployment glue (ONNX custom-op schemas, TensorRT plugins)."""
