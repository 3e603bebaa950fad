"""A trained Speech LLM as a self-contained Hugging Face directory: the exporter (exporter.py) and the modelling
code it copies next to the weights (template/: transformers and torch only, no import of this package)."""
