"""The sequential pass's plumbing, in the order data flows: which modules (:mod:`.plan`), calibration text to token
windows (:mod:`.calibration`), the decoder blocks and what the model feeds them (:mod:`.blocks`), the Hessians of
every module's inputs (:mod:`.hessians`), what sits on the compute device (:mod:`.residency`), resumable
checkpoints of finished blocks (:mod:`.checkpoint`, checked against digests of the weights, :mod:`.digest`) and the work split under torch.distributed
(:mod:`.distributed`)."""
