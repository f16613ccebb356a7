"""Client keys: who may use Nexus, with which limits, and what each key has used."""
