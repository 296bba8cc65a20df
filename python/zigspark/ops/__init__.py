"""Public ops, one module per op. Importing a module registers its ``zigspark::`` custom ops; the
functions are re-exported from the top-level ``zigspark`` package."""
