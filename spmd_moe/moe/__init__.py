"""The MoE layer as four nouns: router, dispatcher (permute, exchange, un-permute),
experts, and the layer that strings them. Imports core, backend, parallel and model.
"""
