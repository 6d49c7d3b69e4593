"""JSON Schema -> GBNF, and the runtime grammar constraint. Imports nothing above it."""
