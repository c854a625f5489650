"""brainlm: foundation models of brain activity (BrainLM masked autoencoders) on parcellated fMRI."""

__version__ = "0.1.0"
