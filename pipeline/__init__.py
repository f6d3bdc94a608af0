"""primaps-pipeline: PriMaPs mask proposals and PriMaPs-EM fitting as a staged, offline pipeline."""

__version__ = "0.1.0"
