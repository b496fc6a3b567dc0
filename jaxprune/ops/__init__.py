"""Small array operations with no knowledge of the model: int8 weights (``int8``), N:M masks (``nm``), block
structure of masks (``blocks``), ordering a recomputation after a value (``order``), the fp32 LoRA linear as
one matmul (``lora``), the Pallas kernels under ``shard_map`` on a device mesh (``sharded``)."""
