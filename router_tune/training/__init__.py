"""Router training: the recipe config (`config`, `recipe_keys`), the RouterTrainer (`trainer`, with its
loop support in `support`), router rescaling (`rescale`) and the dry-run plan (`plan`).
Imports: every package below it (errors, io, architectures, model, data, losses, routing, export,
evaluation); the trainer runs the before/after evaluation and writes router files.
"""
