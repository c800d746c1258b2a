"""Data of dera-t5x: seqio tasks, bundled data, vocabularies, numpy pipelines.

Importing ``tasks`` registers its tasks with seqio; this package imports
TensorFlow and seqio, so the models, decoding and training steps never
import it (only the job drivers and entry points do).
"""
