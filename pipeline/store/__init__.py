"""Every on-disk format of the pipeline lives here, and only here."""
