"""Export trained routers: splice them into the source's safetensors shards by byte ranges
(`splice`, `layouts`), verify the result (`verify`), write full models, router-only deltas and
PEFT adapters (`exporter`, `apply`, `peft_adapter`) with a model card (`model_card`).
Imports: errors, io, architectures, model.
"""
