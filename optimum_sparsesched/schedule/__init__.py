"""The layer-wise sparsity schedule: per-layer statistics measured on the dense model (:mod:`.statistics`), the
pure allocators that spread a target over layers (:mod:`.allocators`), and the policy that turns a run's options
and statistics into one sparsity per module (:mod:`.allocate`)."""
