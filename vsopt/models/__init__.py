"""The reference model vsopt measures accuracy on (docs/MODEL.md).

    data       procedural clips of moving, turning, occluding shapes, with descriptions
    model      the diffusers WanTransformer3DModel config, checkpoint save/load, load_shipped()
    sampler    Euler sampling on the flow (any callable with Wan's forward signature)
    train      the rectified-flow training script
    structure  per-head block-mass concentration of the attention, trained vs initialisation

Submodules are imported explicitly (diffusers is only needed by model, train and structure).
"""
