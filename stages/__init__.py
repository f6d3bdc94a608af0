"""One module per pipeline stage: read inputs from the store, call the library, write outputs."""
