"""The `router-tune` sub-commands, one module per command named after it: argparse, run and
printing only; the work is done by the library packages. Nothing imports this package except
`router_tune.cli`.
"""
