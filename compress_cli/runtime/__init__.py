"""Running models outside of training: the measurement every stage gets (:mod:`.measure`), the
runners a model is measured through (:mod:`.runners`), deployment exports (:mod:`.export`), ONNX
Runtime as a module (:mod:`.ort`) and torchrun process groups (:mod:`.distributed`)."""
