"""The MoE model in memory: load and describe it (`loading`), its routers (`routers`: find, freeze,
fp32, state dicts, logits capture), expert fingerprints (`fingerprints`) and the training-memory
estimate (`memory`). Imports: errors, io, architectures.
"""
