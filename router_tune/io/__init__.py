"""Files router_tune reads and writes, treated as untrusted: checkpoint directories (`checkpoint`),
safetensors headers and byte ranges (`shards`, the one header parser), and trained routers on disk
(`router_files`). Imports: errors only.
"""
