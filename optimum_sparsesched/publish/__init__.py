"""Getting a compressed model out: ``save_pretrained`` that replaces only its own files and never leaves a
half-written folder (:mod:`.save` over :mod:`.staging`), the
model card (:mod:`.model_card`) and the Hugging Face Hub upload (:mod:`.hub`)."""
