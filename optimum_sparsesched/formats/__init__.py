"""How compressed weights are stored and used: what to store (:mod:`.spec`, ``ExportSpec``), one module's stored
tensors in the export format (:mod:`.encode`), the lossless compact checkpoint layout (:mod:`.compact`) and its
transformers load operation (:mod:`.compact_load`), what every saved weight file records for the checks on load
(:mod:`.metadata`), the compressed-tensors ``pack-quantized`` export (:mod:`.compressed_tensors`), and 2:4 weights as
PyTorch semi-structured sparse tensors for GPU kernels (:mod:`.semi_structured`)."""
