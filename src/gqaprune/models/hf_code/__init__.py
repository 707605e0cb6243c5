"""Modeling code that is copied next to every pruned checkpoint whose layers differ in shape.

It must stay self-contained (torch + transformers only): a user loads the checkpoint with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` without this package.
"""
