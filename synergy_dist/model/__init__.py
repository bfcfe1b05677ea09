"""SynergyLM: the model (synergy.py), its configuration (config.py) and their parts."""
