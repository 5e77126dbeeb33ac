"""BiomedJourney: counterfactual chest X-ray generation (research and education only, not for diagnosis)."""
__version__ = "0.1.0"

NOTICE = ("Research and education only - not for diagnosis. "
          "Generated images are synthetic and do not show a real patient.")


def __getattr__(name):  # lazy: importing the package stays cheap (no torch until needed)
    if name in ("BiomedJourneyPipeline", "GenerationOutput", "NoiseOptimization"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "GuidanceModel":
        from .guidance import GuidanceModel
        return GuidanceModel
    if name in ("load_image", "load_model_input", "read_image"):
        from . import imaging
        return getattr(imaging, name)
    if name == "describe_progression":
        from .progression import describe_progression
        return describe_progression
    raise AttributeError(name)
