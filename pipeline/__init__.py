"""koala-pipeline: KOALA speculative decoding (draft heads, decoder, metrics) and its Ray pipeline."""
