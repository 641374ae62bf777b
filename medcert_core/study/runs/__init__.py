"""Certification runs (:mod:`.run`), the cache of the models they train (:mod:`.assets`) and the
results store that keeps them (:mod:`.store`)."""
