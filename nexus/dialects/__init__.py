"""Pure translators between OpenAI chat (Nexus's internal form) and other wire formats; no I/O."""
