"""The layer-wise sparsity schedule: what it is asked (:mod:`.spec`), per-layer statistics measured on the dense
model (:mod:`.statistics`), the pure allocators that spread a target over layers (:mod:`.allocators`), the policy
that turns the statistics into one sparsity per module (:mod:`.allocate`), and the allocation search that refines it
(:mod:`.search`)."""
