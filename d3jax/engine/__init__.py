"""The engine: the jitted training loop shared by attacks and defenses (``train``), its
sharpness-aware step (``sharpness``) and JAX's persistent compilation cache (``compile_cache``)."""
