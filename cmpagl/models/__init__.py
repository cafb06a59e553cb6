"""The CMPAGL encoders: Gswin image encoder (:mod:`.gswin`), the BERT split into text and
multimodal encoders (:mod:`.text`), and the model that joins them (:mod:`.cmpagl`)."""
