"""The Optimal-Brain-Surgeon solve of one layer: :func:`.prune.prune` (weight, Hessian, :class:`.spec.PruneSpec`)
-> :class:`.spec.PruneResult`, over the inverse Hessian's Cholesky factor (:mod:`.inverse`), with the column scan in
torch (:mod:`.sparsegpt`) or in Triton (:mod:`.sparsegpt_triton`), the per-block mask and grid decisions they share
(:mod:`.columns`), the quantization grids (:mod:`.grid`) and the solvers that refine the scan: exactly per layer
(:mod:`.admm`) and over a whole block's output (:mod:`.reconstruct`)."""
