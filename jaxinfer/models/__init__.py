"""Model definitions: functional (params pytree in, arrays out, KV cache passed explicitly)."""
