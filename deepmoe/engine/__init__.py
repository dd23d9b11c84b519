"""The inference engine: sequences, paged latent KV-cache bookkeeping, scheduling."""
