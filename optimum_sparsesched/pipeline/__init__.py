"""The plumbing of a pass over the decoder blocks: which modules (:mod:`.plan`), calibration text to token windows
(:mod:`.calibration`), the decoder blocks and what the model feeds them (:mod:`.blocks`), the one block visit that
brings a block's weights to the compute device and swaps candidate weights in and out (:mod:`.sources`, over
accelerate's offload hooks in :mod:`.offload`, with glibc's allocator kept flat in :mod:`.host_memory`), the
Hessians of every module's inputs (:mod:`.hessians`), what sits on the compute device (:mod:`.residency`, byte sizes
in :mod:`.sizes`), per-block activations on disk (:mod:`.spill`), the resume state (:mod:`.resume` over the block
files of :mod:`.checkpoint` and the digests of :mod:`.digest`) and the work split under torch.distributed
(:mod:`.distributed`)."""
