"""Evaluation: held-out perplexity and routing of a model, oracle routing (`evaluate`) and the
report files and tables (`report`). Imports: errors, io, architectures, model, data, losses, routing.
"""
