"""Getting a compressed model out: ``save_pretrained`` that never leaves a half-written folder (:mod:`.save`), the
model card (:mod:`.model_card`) and the Hugging Face Hub upload (:mod:`.hub`)."""
