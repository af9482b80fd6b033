"""Per-sample gradient sketches of a Megatron GPT and the influence selector built on them."""
