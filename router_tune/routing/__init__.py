"""What the routers do: routing statistics (`stats`), telemetry for wandb / tensorboard / the
console (`telemetry`), figures (`plots`) and checkpoint health reports (`inspection`).
Imports: errors, io, architectures, model, data, losses.
"""
