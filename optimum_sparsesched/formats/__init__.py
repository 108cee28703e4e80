"""How compressed weights are stored and used: the lossless compact checkpoint layout (:mod:`.compact`), the
compressed-tensors ``pack-quantized`` export (:mod:`.compressed_tensors`), and 2:4 weights as PyTorch
semi-structured sparse tensors for GPU kernels (:mod:`.semi_structured`)."""
