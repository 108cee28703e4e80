"""Getting a compressed model out: the one checkpoint writer, fed block by block, and the step after every save
(:mod:`.writer`, over the safetensors shards of :mod:`.shards`), ``save_pretrained`` that replaces only its own files
and never leaves a half-written folder (:mod:`.save` over :mod:`.staging`), the model card (:mod:`.model_card`,
:mod:`.schedule_view`, :mod:`.eval_results`) and the Hugging Face Hub upload (:mod:`.hub`)."""
