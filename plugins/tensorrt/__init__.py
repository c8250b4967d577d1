"""vsopt.plugins.tensorrt: TensorRT for the custom ONNX form (see docs/EXPORT.md, "trt").

    ptx.py     vsopt's kernel compiled ahead of time to PTX for sm_90 (no GPU needed)
    entry.py   the kernel with TensorRT's AOT calling convention
    plugin.py  tensorrt.plugin definitions of the vsopt nodes (imports tensorrt)
    build.py   the ONNX TensorRT's parser takes, and the engine build
"""
