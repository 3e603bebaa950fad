"""Shard builders: each module is a command (`python -m data_prep.<name> --help`)."""
