"""Weight methods of the linear layers: how a layer stores its weight and computes its product.

Each linear layer (and the LM head) gets a `LinearMethod` when it is constructed
(`base.create_linear_method`, from the `pagoda.loader.weight_plan.WeightPlan` the model is built
under): the method creates the layer's parameters, takes what the loader hands its
`weight_loader` (checkpoint tensors, or a GGUF file's blocks as stored), post-processes once after
loading (`process_weights_after_loading`) and computes the product (`apply`). Methods here:
`base.UnquantizedLinearMethod` (float, as computed), `half` (float16 packed by fbgemm on CPUs),
`gguf` (Q8_0 / Q4_0 / Q4_1 blocks multiplied as stored by the CPU block GEMM).
"""
