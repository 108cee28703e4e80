"""The Optimal-Brain-Surgeon solve of one layer: :func:`.prune.prune` (weight, Hessian, :class:`.spec.PruneSpec`)
-> :class:`.spec.PruneResult`, over the inverse Hessian's Cholesky factor (:mod:`.inverse`), with the column scan in
torch (:mod:`.sparsegpt`) or in Triton (:mod:`.sparsegpt_triton`), the per-block mask and grid decisions they share
(:mod:`.columns`) and the quantization grids (:mod:`.grid`)."""
