"""vsopt.plugins.onnx: the vsopt ops in ONNX, through torch.onnx.export(dynamo=True) and a custom
translation table (onnxscript), in two forms of the same graph:

    portable.py   standard ONNX ops only (any runtime): tables -> boolean masks, orders -> gathers
    custom.py     one "vsopt"-domain node per op (schemas.py), for runtimes with vsopt's kernel
    readback.py   a custom-form model -> the plan entries it carries (the round trip)

Importing this package imports no ONNX library (the extra is optional); its modules do.
"""

#: Key under FX node.meta["custom"] (which torch.export keeps across a re-export and in .pt2
#: files) of a vsopt node's origin: {"site_id": str, "heads": [int], "orders": [str]}.
NODE_META_KEY = "vsopt"
