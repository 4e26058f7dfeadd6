"""Input data: JSON Schemas and row-numbered validation (`schemas`), readers and writers (`io`).

Submodules are imported where needed, so `import alignment.data` stays light.
"""
