"""Lets `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` find the class (pip install biomedjourney)."""
from biomedjourney.pipeline import BiomedJourneyPipeline  # noqa: F401
