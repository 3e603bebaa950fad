"""The modelling code an exported directory holds (configuration_part.py, modeling_part.py, processing_part.py).
Copied there as plain files; they import only torch and transformers (and each other, relatively)."""
