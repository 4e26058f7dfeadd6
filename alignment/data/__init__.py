"""Input data: JSON Schemas and row-numbered validation (`schemas`), readers and writers (`io`), recipe
sources (`sources`), adapters for public data sets as published (`adapters`), the paper's RM mixes and
test-prompt deduplication (`mixing`), and `align data stats` (`stats`).

Submodules are imported where needed, so `import alignment.data` stays light.
"""
