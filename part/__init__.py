"""part: Progressive Alignment Representation Training for multilingual Speech LLMs."""

__version__ = "0.1.0"
